"""The Triton paged decode kernel, its cascade (shared-prefix) variant and the "triton" paged backend.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set here and in conftest before triton is
imported), so sizes stay small: B <= 8 sequences, K <= 40 keys, head dim 16/32, key tiles of 16.
Tolerances (max abs error against an fp32 gather + softmax reference, inputs ~N(0, 1)): fp32 1e-5,
fp16 5e-3, bf16 3e-2 (bf16 is upcast to fp32 under the interpreter).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

triton = pytest.importorskip("triton")

from test_paged_cascade import LAYER, cascade_and_plain_metadata, random_decode_groups  # noqa: E402

from helpers import SequenceStep, runner_logits, tiny_model  # noqa: E402
from treerpo.attention import registry, triton_backends  # noqa: E402
from treerpo.attention.paged import PagedAttentionMetadata  # noqa: E402
from treerpo.attention.registry import get_paged_backend  # noqa: E402
from treerpo.attention.triton_backends import paged_decode_backend  # noqa: E402
from treerpo.engine import model_runner  # noqa: E402
from treerpo.engine.kv_pool import KVPool  # noqa: E402
from treerpo.engine.model_runner import ModelRunner, kv_shape  # noqa: E402
from treerpo.kernels import paged_decode  # noqa: E402
from treerpo.kernels.paged_decode import (  # noqa: E402
    EMPTY_LSE,
    cascade_decode_attention,
    merge_attention_states,
    merge_two,
    paged_decode_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def triton_paged_backend():
    """The "triton" paged backend registered, as ``default_paged_backend`` does on CUDA (not at kernel import)."""
    assert registry._register_triton("paged")


def reference(q, k_cache, v_cache, kv_slots, kv_len, scale=None):
    """fp32 gather + softmax per sequence: (out [B, Hq, D], natural LSE [B, Hq])."""
    b, hq, d = q.shape
    group = hq // k_cache.shape[1]
    scale = d**-0.5 if scale is None else scale
    outs, lses = [], []
    for i in range(b):
        idx = kv_slots[i, : int(kv_len[i])]
        k = k_cache[idx].float().repeat_interleave(group, 1)  # [n, Hq, D]
        v = v_cache[idx].float().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v))
        lses.append(torch.logsumexp(s, -1))
    return torch.stack(outs), torch.stack(lses)


def random_case(seed, b, hq, hkv, d, max_k, dtype, slots=128, share=True):
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(slots, hkv, d, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(slots, hkv, d, generator=gen).to(DEVICE, dtype)
    q = torch.randn(b, hq, d, generator=gen).to(DEVICE, dtype)
    kv_len = torch.randint(1, max_k + 1, (b,), generator=gen)
    kv_len[0] = max_k
    kv_slots = torch.randint(0, slots, (b, max_k), generator=gen)  # padding past kv_len: arbitrary slots
    if share and b > 1:  # rows sharing pages: the same slot ids in several rows
        n = int(min(kv_len[0], kv_len[1]))
        kv_slots[1, :n] = kv_slots[0, :n]
        kv_slots[-1, : int(kv_len[-1])] = kv_slots[0, torch.randperm(max_k, generator=gen)[: int(kv_len[-1])]]
    return q, k_cache, v_cache, kv_slots.to(DEVICE), kv_len.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "b,hq,hkv,d,max_k", [(1, 2, 2, 16, 1), (5, 4, 2, 32, 37), (8, 8, 2, 16, 40), (3, 3, 1, 32, 17)]
)
def test_plain_kernel_matches_reference(b, hq, hkv, d, max_k, dtype):
    q, kc, vc, slots, lens = random_case(b * 100 + max_k, b, hq, hkv, d, max_k, dtype)
    out, lse = paged_decode_attention(q, kc, vc, slots, lens, return_lse=True)
    ref, ref_lse = reference(q, kc, vc, slots, lens)
    assert out.dtype == dtype and out.shape == (b, hq, d)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=max(TOL[dtype], 1e-4), rtol=0)


@pytest.mark.parametrize("splits", [2, 3])
def test_split_k_matches_reference(splits):
    q, kc, vc, slots, lens = random_case(7, 6, 4, 2, 16, 40, torch.float32)
    scale = 0.3
    out, lse = paged_decode_attention(q, kc, vc, slots, lens, scale=scale, splits=splits, return_lse=True)
    ref, ref_lse = reference(q, kc, vc, slots, lens, scale=scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


def sibling_groups(seed, dtype, d=16, hq=4, hkv=2):
    """8 sequences: group 0 = rows 0, 2, 5 (prefix 21 slots), group 1 = rows 1, 6 (prefix 5),
    group 2 = row 4 alone (prefix 3), rows 3 and 7 in no group."""
    gen = torch.Generator().manual_seed(seed)
    slots, max_k = 160, 40
    kc = torch.randn(slots, hkv, d, generator=gen).to(DEVICE, dtype)
    vc = torch.randn(slots, hkv, d, generator=gen).to(DEVICE, dtype)
    q = torch.randn(8, hq, d, generator=gen).to(DEVICE, dtype)
    group_of_seq = torch.tensor([0, 1, 0, -1, 2, 0, 1, -1])
    prefix_len = torch.tensor([21, 5, 3])
    prefix_slots = torch.randint(0, slots, (3, 24), generator=gen)
    kv_slots = torch.randint(0, slots, (8, max_k), generator=gen)
    kv_len = torch.randint(1, max_k + 1, (8,), generator=gen)
    for i, g in enumerate(group_of_seq.tolist()):
        if g >= 0:
            p = int(prefix_len[g])
            kv_slots[i, :p] = prefix_slots[g, :p]
            kv_len[i] = max(int(kv_len[i]), p + 1)  # at least the new token after the prefix
    kv_len[5] = prefix_len[0] + 1  # a suffix of the new token only
    return (
        q,
        kc,
        vc,
        kv_slots.to(DEVICE),
        kv_len.to(DEVICE),
        prefix_slots.to(DEVICE),
        prefix_len.to(DEVICE),
        group_of_seq.to(DEVICE),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("splits", [None, 2])
def test_cascade_matches_the_plain_kernel(dtype, splits):
    q, kc, vc, slots, lens, pslots, plen, groups = sibling_groups(3, dtype)
    plain, plain_lse = paged_decode_attention(q, kc, vc, slots, lens, return_lse=True)
    out, lse = cascade_decode_attention(q, kc, vc, slots, lens, pslots, plen, groups, splits=splits, return_lse=True)
    assert out.dtype == dtype and out.shape == plain.shape
    torch.testing.assert_close(out.float(), plain.float(), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(lse, plain_lse, atol=max(TOL[dtype], 1e-4), rtol=0)
    ref, _ = reference(q, kc, vc, slots, lens)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=0)


def test_cascade_without_groups_is_the_plain_kernel():
    q, kc, vc, slots, lens, pslots, plen, groups = sibling_groups(4, torch.float32)
    out = cascade_decode_attention(q, kc, vc, slots, lens, pslots, plen, torch.full_like(groups, -1))
    torch.testing.assert_close(out, paged_decode_attention(q, kc, vc, slots, lens), atol=1e-6, rtol=0)


def test_lse_merge_equals_attention_over_the_concatenation():
    gen = torch.Generator().manual_seed(11)
    b, hq, d = 3, 4, 16
    kc, vc = torch.randn(60, 2, d, generator=gen).to(DEVICE), torch.randn(60, 2, d, generator=gen).to(DEVICE)
    q = torch.randn(b, hq, d, generator=gen).to(DEVICE)
    first = torch.randint(0, 60, (b, 13), generator=gen).to(DEVICE)
    second = torch.randint(0, 60, (b, 9), generator=gen).to(DEVICE)
    l1 = torch.tensor([13, 4, 1], device=DEVICE)
    l2 = torch.tensor([9, 9, 2], device=DEVICE)
    o1, lse1 = paged_decode_attention(q, kc, vc, first, l1, return_lse=True)
    o2, lse2 = paged_decode_attention(q, kc, vc, second, l2, return_lse=True)
    out, lse = merge_two(o1, lse1, o2, lse2)
    concat = torch.zeros(b, 22, dtype=torch.int64, device=DEVICE)
    for i in range(b):
        n1, n2 = int(l1[i]), int(l2[i])
        concat[i, :n1], concat[i, n1 : n1 + n2] = first[i, :n1], second[i, :n2]
    ref, ref_lse = reference(q, kc, vc, concat, l1 + l2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    # a partial that saw no key has weight 0
    empty = torch.full_like(lse1, EMPTY_LSE)
    alone, alone_lse = merge_attention_states(torch.stack((o1, torch.zeros_like(o1))), torch.stack((lse1, empty)))
    torch.testing.assert_close(alone, o1, atol=0, rtol=0)
    torch.testing.assert_close(alone_lse, lse1, atol=1e-6, rtol=0)


def test_backend_matches_the_torch_backend_and_falls_back_for_prefill():
    torch.manual_seed(0)
    hq, hkv, d, n_layers = 4, 2, 16, 1
    pool = KVPool(n_layers, hkv, d, torch.float32, DEVICE, num_pages=64)
    module = type("Attn", (), {"layer_idx": 0})()
    old = pool.alloc(10)
    pool.write(0, old, torch.randn(10, hkv, d), torch.randn(10, hkv, d))
    # decode: 4 sequences sharing the first slots (siblings), one new token each
    new = pool.alloc(4)
    seqs = [(old[:6], new[0:1]), (old[:6], new[1:2]), (old[:10], new[2:3]), (old[:3], new[3:4])]
    for n_new, sequences in ((1, seqs), (3, None)):
        if sequences is None:  # prefill: 3 new tokens for 2 sequences -> the torch fallback
            extra = pool.alloc(6)
            sequences = [(old[:4], extra[:3]), (old[:2], extra[3:])]
        n = sum(len(s[1]) for s in sequences)
        q = torch.randn(1, hq, n, d, device=DEVICE)
        k, v = torch.randn(1, hkv, n, d, device=DEVICE), torch.randn(1, hkv, n, d, device=DEVICE)
        meta = PagedAttentionMetadata.build(pool, sequences, DEVICE)
        ref = get_paged_backend("torch")(module, q, k, v, meta, None)
        got = paged_decode_backend(module, q, k, v, meta, None)
        assert got.shape == ref.shape == (1, n, hq, d)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert registry._register_triton("paged")
    assert get_paged_backend("triton") is paged_decode_backend


@pytest.mark.parametrize("seed,scale", [(0, None), (1, 0.37), (2, None)])
def test_cascade_backend_matches_the_torch_paths(seed, scale):
    """Decode metadata with sibling groups: the backend's cascade kernel equals the torch cascade and the torch
    path over whole paths (fp32)."""
    case = random_decode_groups(seed, hq=6 if seed % 2 else 4, hkv=1 if seed == 2 else 2, device=DEVICE)
    pool, prefixes, group_of_seq, suffixes, new_slots, q, k, v = case
    cascade_meta, plain_meta = cascade_and_plain_metadata(pool, prefixes, group_of_seq, suffixes, new_slots, DEVICE)
    plain = get_paged_backend("torch")(LAYER, q, k, v, plain_meta, scale)
    torch_cascade = get_paged_backend("torch")(LAYER, q, k, v, cascade_meta, scale)
    got = paged_decode_backend(LAYER, q, k, v, cascade_meta, scale)
    assert got.shape == plain.shape
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, torch_cascade, atol=1e-5, rtol=0)


def test_runner_uses_torch_off_cuda():
    assert model_runner.default_paged_backend("cpu") == "torch"


def test_engine_forward_with_the_triton_backend(monkeypatch):
    """ModelRunner prefill + decode of siblings: logits of the "triton" backend equal the "torch" backend's."""
    model = tiny_model().to(DEVICE)
    layers, kv_heads, head_dim = kv_shape(model.config)
    calls = []

    def spy(*args):
        calls.append(1)
        return paged_decode_backend(*args)

    from treerpo.attention import kernel_check

    monkeypatch.setattr(kernel_check, "_enabled", False)  # counts the model's calls only (the check: test_kernel_check)
    monkeypatch.setitem(registry._BACKENDS["paged"], "triton", spy)
    logits = {}
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 40, size=7).tolist()
    children = [rng.integers(1, 40, size=3).tolist() for _ in range(3)]
    for backend in ("torch", "triton"):
        monkeypatch.setattr(model_runner, "default_paged_backend", lambda device, b=backend: b)
        pool = KVPool(layers, kv_heads, head_dim, torch.float32, DEVICE, num_pages=128)
        runner = ModelRunner(model, pool)
        assert runner.paged_backend == backend
        root = pool.alloc(len(prompt))
        out = [runner_logits(runner, [SequenceStep(root[:0], prompt, root)])]
        paths = [root.clone() for _ in children]
        for t in range(3):  # three decode steps of three siblings sharing the prompt's slots
            new = pool.alloc(len(children))
            out.append(
                runner_logits(
                    runner, [SequenceStep(paths[i], [children[i][t]], new[i : i + 1]) for i in range(len(children))]
                )
            )
            paths = [torch.cat((p, new[i : i + 1])) for i, p in enumerate(paths)]
        logits[backend] = torch.cat(out)
    assert len(calls) == 4 * layers  # every forward (prefill falls back inside the backend)
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cascade", [True, False])
def test_tree_sampler_with_the_triton_backend_samples_the_same_trees(monkeypatch, cascade):
    from treerpo.engine.tree_sampler import TreeSampler
    from treerpo.models.tiny import build_char_tokenizer, build_tiny_model
    from treerpo.tree import TreeSpec

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=3).to(DEVICE).eval()
    prompts = [tok(p)["input_ids"] for p in ("12+3-4=", "7-19+2=")]
    spec = TreeSpec((2, 2), segment_tokens=3, temperature=1.0)
    cascade_calls = []
    monkeypatch.setattr(
        triton_backends,
        "cascade_decode",
        lambda *args, f=triton_backends.cascade_decode: cascade_calls.append(1) or f(*args),
    )
    trees = {}
    for backend in ("torch", "triton"):
        monkeypatch.setattr(model_runner, "default_paged_backend", lambda device, b=backend: b)
        sampler = TreeSampler(model, tok, pool_tokens=1024, cascade=cascade)
        sampler.runner.cascade_min_saved_bytes = 0  # a model this small would leave the cascade off
        assert sampler.runner.paged_backend == backend
        trees[backend] = sampler.sample(prompts, spec, seeds=[1, 2])
    assert bool(cascade_calls) == cascade
    for a, b in zip(trees["torch"], trees["triton"], strict=True):
        assert a.parent.tolist() == b.parent.tolist()
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4, rtol=1e-4)


def test_default_paged_backend_on_cuda_and_its_fallback(monkeypatch, caplog):
    """The selection logic alone (no GPU needed): CUDA -> "triton" when the kernel imports; when the import
    fails, one notice and "torch"."""
    import sys

    from treerpo.attention import optional_kernels

    cache, kernel = optional_kernels._import_cache, "treerpo.kernels.paged_decode"
    monkeypatch.delitem(cache, kernel, raising=False)
    assert model_runner.default_paged_backend("cuda") == "triton"
    monkeypatch.delitem(cache, kernel)  # forget the import (restored after the test)
    monkeypatch.setitem(sys.modules, kernel, None)  # import now raises ImportError
    with caplog.at_level("WARNING", logger=registry.__name__):
        assert model_runner.default_paged_backend(torch.device("cuda", 0)) == "torch"
        assert model_runner.default_paged_backend("cuda") == "torch"
    assert len([r for r in caplog.records if "Triton paged decode attention unavailable" in r.message]) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_kernel_equals_the_torch_merge(dtype):
    """``merge_partials`` (one kernel) against ``merge_attention_states``: splits that are empty (LSE at
    ``EMPTY_LSE`` or -inf, their outputs never written: NaN here) have weight 0, a row with every split empty
    stays empty, and the output comes in the asked dtype."""
    from treerpo.kernels.paged_decode import merge_partials

    gen = torch.Generator().manual_seed(3)
    s, r, h, d = 4, 5, 3, 24
    outs = torch.randn(s, r, h, d, generator=gen)
    lses = torch.randn(s, r, h, generator=gen) * 3
    lses[1, :2] = EMPTY_LSE
    lses[2, 3] = float("-inf")
    lses[:, 4, 0] = EMPTY_LSE  # (row 4, head 0): nothing seen at all
    ref_out, ref_lse = merge_attention_states(outs, lses)
    outs[lses < -1e29] = float("nan")  # unwritten partials must not be read
    out, lse = merge_partials(outs.to(DEVICE), lses.to(DEVICE), dtype)
    assert out.dtype == dtype and out.shape == (r, h, d)
    seen = torch.ones(r, h, dtype=torch.bool)
    seen[4, 0] = False
    torch.testing.assert_close(out.float().cpu()[seen], ref_out[seen], atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(lse.cpu()[seen], ref_lse[seen], atol=1e-5, rtol=0)
    assert lse[4, 0] < -1e29 and torch.equal(out[4, 0].float().cpu(), torch.zeros(d))  # nothing seen: 0, empty


def test_split_k_longer_than_a_row_leaves_its_splits_empty():
    """Split-K sized for the longest row: a short row's later splits hold no key, store nothing, and the
    answer is still the reference's (every row, short and long)."""
    gen = torch.Generator().manual_seed(5)
    b, hq, d = 3, 4, 16
    kc, vc = torch.randn(80, 2, d, generator=gen).to(DEVICE), torch.randn(80, 2, d, generator=gen).to(DEVICE)
    q = torch.randn(b, hq, d, generator=gen).to(DEVICE)
    slots = torch.randint(0, 80, (b, 64), generator=gen).to(DEVICE)
    lens = torch.tensor([64, 3, 17], device=DEVICE)
    out, lse = paged_decode_attention(q, kc, vc, slots, lens, splits=4, return_lse=True)
    ref, ref_lse = reference(q, kc, vc, slots, lens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", ["plain", "cascade_with_ungrouped_rows"])
def test_partials_are_written_whatever_the_buffers_held(monkeypatch, path):
    """The partial buffers come unfilled: an empty split stores its rows' empty LSE itself, and rows in no group get
    theirs from a fill. Buffers poisoned with NaN (outputs) and a large LSE that would outweigh every real partial
    leave the answer the reference's."""
    real = paged_decode._empty_partials

    def poisoned(*args):
        out, lse = real(*args)
        return out.fill_(float("nan")), lse.fill_(1e30)

    monkeypatch.setattr(paged_decode, "_empty_partials", poisoned)
    q, kc, vc, slots, lens, pslots, plen, groups = sibling_groups(6, torch.float32)
    if path == "plain":
        out = paged_decode_attention(q, kc, vc, slots, lens, splits=4)
    else:
        out = cascade_decode_attention(q, kc, vc, slots, lens, pslots, plen, groups, splits=3)
    ref, _ = reference(q, kc, vc, slots, lens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
