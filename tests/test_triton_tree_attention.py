"""The Triton tree attention (forward and backward) against the SDPA dense-mask reference.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set here and in conftest before triton is
imported), so sizes stay small: N <= ~100 tokens, head dim 16/32, tiles of 16 rows.

Tolerances (max abs error against the fp32 reference, inputs ~N(0, 1)):
  fp32: 1e-4 forward and backward; fp16: 5e-3 forward, 2e-2 backward; bf16: 3e-2 forward, 5e-2 backward
  (bf16 loads are upcast to fp32 under the interpreter, which computes bf16 wrongly; on a GPU the dots
  run in bf16 with fp32 accumulation).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

triton = pytest.importorskip("triton")

from helpers import assert_close_normwise, random_tree  # noqa: E402
from treerpo.attention import registry  # noqa: E402
from treerpo.attention.sdpa_backend import interval_mask, sdpa_tree_attention  # noqa: E402
from treerpo.attention.triton_backends import skip_lists, transpose_skip, triton_tree_backend  # noqa: E402
from treerpo.kernels.tile_configs import TileConfig, TreeTiles  # noqa: E402
from treerpo.trees.packing import pack_trees  # noqa: E402
from treerpo.trees.tile_skip import tile_skip_dense  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 16
TILES = TreeTiles(*[TileConfig(BLOCK, BLOCK, 4, 1)] * 3)  # 16 lanes: 16 // group query rows a tile
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 2e-2), torch.bfloat16: (3e-2, 5e-2)}


def _batch(case: str):
    rng = np.random.default_rng({"single_node": 1, "chain": 2, "fan": 3, "several": 4}[case])
    trees = {
        "single_node": [random_tree(rng, 0, prompt_len=5)],
        "chain": [random_tree(rng, 20, shape="chain", prompt_len=3, max_segment=4)],
        "fan": [random_tree(rng, 25, shape="fan", prompt_len=4, max_segment=3)],
        "several": [
            random_tree(rng, 6),
            random_tree(rng, 4, shape="chain"),
            random_tree(rng, 0),
            random_tree(rng, 7, shape="fan"),
            random_tree(rng, 5),
        ],
    }[case]
    return pack_trees(trees)


def _run(batch, hq, hkv, d, dtype, seed=0, cache=None, scale=None, tiles=TILES, layout="bhnd"):
    """``layout`` "bnhd": the inputs are transposed views of [B, N, H, D] tensors (as a model's projections
    give them), read through their strides."""
    n = batch.tin.numel()
    gen = torch.Generator().manual_seed(seed)
    if layout == "bnhd":
        q, k, v = (torch.randn(1, n, h, d, generator=gen).to(DEVICE, dtype).transpose(1, 2) for h in (hq, hkv, hkv))
    elif layout == "fused":  # slices of one [B, N, Hq + 2 Hkv, D] projection (Phi-3's qkv_proj): views with gaps
        qkv = torch.randn(1, n, hq + 2 * hkv, d, generator=gen).to(DEVICE, dtype)
        q, k, v = (x.transpose(1, 2) for x in qkv.split([hq, hkv, hkv], dim=2))
    else:
        q, k, v = (torch.randn(1, h, n, d, generator=gen).to(DEVICE, dtype) for h in (hq, hkv, hkv))
    grad = torch.randn(1, hq, n, d, generator=gen).to(DEVICE, dtype)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = triton_tree_backend(
        *leaves,
        batch.tin.to(DEVICE),
        batch.tout.to(DEVICE),
        scale=scale,
        cache={} if cache is None else cache,
        tiles=tiles,
    )
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [x.float().clone().requires_grad_() for x in (q, k, v)]
    ref = sdpa_tree_attention(*ref_leaves, batch.tin.to(DEVICE), batch.tout.to(DEVICE), scale=scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.float())
    return out, grads, ref, ref_grads


def _check(out, grads, ref, ref_grads, dtype):
    fwd_tol, bwd_tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=fwd_tol, rtol=0)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        torch.testing.assert_close(g.float(), r, atol=bwd_tol, rtol=0, msg=lambda m: f"{name}: {m}")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["single_node", "chain", "fan", "several"])
def test_matches_sdpa_gqa(case, dtype):
    batch = _batch(case)
    out, grads, ref, ref_grads = _run(batch, hq=4, hkv=2, d=32, dtype=dtype)
    _check(out, grads, ref, ref_grads, dtype)


@pytest.mark.parametrize("case", ["single_node", "chain", "fan", "several"])
def test_cases_have_ragged_lengths(case):
    """The cases above cover lengths that are not a multiple of the tile (partial last tiles)."""
    n = _batch(case).tin.numel()
    assert n % BLOCK and n <= 110


@pytest.mark.parametrize("hq,hkv,d", [(2, 2, 16), (4, 1, 16), (2, 1, 24), (12, 2, 16), (6, 2, 24), (20, 1, 16)])
def test_head_layouts_and_dims(hq, hkv, d):
    """Plain multi-head, every query head on one KV head, a head dim that is not a power of two, and groups
    that do not divide a tile's 16 lanes (6 and 3 heads: 2 and 5 rows a tile, lanes left idle) or exceed it
    (20 heads: the tile widened to 32 lanes)."""
    batch = _batch("several")
    out, grads, ref, ref_grads = _run(batch, hq=hq, hkv=hkv, d=d, dtype=torch.float32, seed=1, scale=0.3)
    _check(out, grads, ref, ref_grads, torch.float32)


def test_kernel_visits_only_the_skip_list():
    """Several trees: the list skips tiles and the answer is still the reference's; the kernel reads the
    cached list (one computation a batch), and dropping a needed tile from it changes the answer."""
    batch = _batch("several")
    n = batch.tin.numel()
    rows = BLOCK // 2  # 4 query heads on 2 KV heads: 2 heads a row in a tile's 16 lanes
    num_q_tiles, num_k_tiles = -(-n // rows), -(-n // BLOCK)
    cache = {}
    out, grads, ref, ref_grads = _run(batch, 4, 2, 16, torch.float32, cache=cache)
    _check(out, grads, ref, ref_grads, torch.float32)
    (key,) = [k for k in cache if k[0] == "triton_skip"]  # one tile shape for all three kernels: one list
    assert key[1:3] == (rows, BLOCK)
    lists = cache[key]
    assert len(lists["key_tiles"]) < num_q_tiles * num_k_tiles, "this batch should skip some tiles"
    # the lists are reused, not recomputed, by a second call (another layer) with the same cache
    out2, *_ = _run(batch, 4, 2, 16, torch.float32, cache=cache)
    assert cache[key] is lists
    torch.testing.assert_close(out2, out)
    # drop the last query tile's first key tile (a needed one: the tree boundary tile): the answer changes
    broken = dict(lists)
    offsets, key_tiles = lists["offsets"].clone(), lists["key_tiles"].clone()
    last = num_q_tiles - 1
    drop = int(offsets[last])
    broken["key_tiles"] = torch.cat([key_tiles[:drop], key_tiles[drop + 1 :]])
    offsets[last + 1 :] -= 1
    broken["offsets"] = offsets
    bad, *_ = _run(batch, 4, 2, 16, torch.float32, cache={key: broken})
    assert not torch.allclose(bad[:, :, last * rows :], ref[:, :, last * rows :], atol=1e-3)
    torch.testing.assert_close(bad[:, :, : last * rows], ref[:, :, : last * rows], atol=1e-4, rtol=0)


def test_each_kernel_its_own_tile_shape():
    """Forward, dK/dV and dQ on three different tile shapes (three skip lists) give the reference's answer."""
    batch = _batch("several")
    tiles = TreeTiles(TileConfig(16, 16, 4, 1), TileConfig(32, 8, 4, 1), TileConfig(8, 32, 4, 1))
    cache = {}
    out, grads, ref, ref_grads = _run(batch, 4, 2, 16, torch.float32, cache=cache, tiles=tiles)
    _check(out, grads, ref, ref_grads, torch.float32)
    assert {k[1:3] for k in cache if k[0] == "triton_skip"} == {(8, 16), (16, 8), (4, 32)}


def test_views_with_gaps_are_copied_not_misread():
    """Query/key/value sliced from one fused projection (gaps between a row's heads): the gradients come out in
    their own dense layout, right."""
    batch = _batch("several")
    out, grads, ref, ref_grads = _run(batch, 4, 2, 16, torch.float32, layout="fused")
    _check(out, grads, ref, ref_grads, torch.float32)


def test_tiles_too_narrow_for_the_group_are_refused():
    batch = _batch("single_node")
    n = batch.tin.numel()
    q, k = torch.randn(1, 32, n, 16), torch.randn(1, 1, n, 16)
    narrow = TreeTiles(*[TileConfig(16, 16, 4, 1)] * 3)
    from treerpo.kernels.tree_attention import triton_tree_attention

    skip = (torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int32))
    with pytest.raises(ValueError, match="fewer lanes than the 32 query heads"):
        triton_tree_attention(q, k, k, batch.tin, batch.tout, skip, skip, skip, narrow)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_inputs_are_read_in_place(dtype):
    """Query/key/value as transposed views of [B, N, H, D] tensors (a model's projections): read through
    their strides, no copy, and the output and gradients keep the inputs' layouts."""
    batch = _batch("fan")
    out, grads, ref, ref_grads = _run(batch, 6, 2, 16, dtype, layout="bnhd")
    _check(out, grads, ref, ref_grads, dtype)
    assert out.transpose(1, 2).is_contiguous() and grads[0].transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("case", ["chain", "fan", "several"])
@pytest.mark.parametrize("block", [16, 8])
def test_transposed_skip_list_is_brute_force(case, block):
    batch = _batch(case)
    n = batch.tin.numel()
    lists = skip_lists(batch.tin, batch.tout, block, "cpu", None)
    offsets, key_tiles = tile_skip_dense(batch.tin, batch.tout, block, block)
    assert torch.equal(lists["offsets"], offsets) and torch.equal(lists["key_tiles"], key_tiles)
    num_tiles = -(-n // block)
    mask = torch.zeros(num_tiles * block, num_tiles * block, dtype=torch.bool)
    mask[:n, :n] = interval_mask(batch.tin.long(), batch.tout.long())
    needed = mask.view(num_tiles, block, num_tiles, block).any(dim=3).any(dim=1)  # [q tile, k tile]
    for kt in range(num_tiles):
        q_tiles = lists["q_tiles"][lists["q_offsets"][kt] : lists["q_offsets"][kt + 1]]
        assert q_tiles.tolist() == torch.nonzero(needed[:, kt]).squeeze(1).tolist()
    q_off, q_tiles = transpose_skip(offsets, key_tiles, num_tiles)
    assert q_off.dtype == torch.long and q_tiles.dtype == torch.int32


def test_bad_shapes_refused():
    batch = _batch("single_node")
    n = batch.tin.numel()
    q, k = torch.randn(1, 3, n, 16), torch.randn(1, 2, n, 16)
    with pytest.raises(ValueError, match="multiple"):
        triton_tree_backend(q, k, k, batch.tin, batch.tout)
    with pytest.raises(ValueError, match="entries"):
        triton_tree_backend(q[:, :2], k, k, batch.tin[:-1], batch.tout[:-1])


def test_default_backend():
    assert registry.default_tree_backend("cpu") == "paths"
    assert registry.default_tree_backend(torch.device("cpu")) == "paths"
    assert registry._register_triton()
    assert registry.get_tree_backend("triton") is triton_tree_backend
    if torch.cuda.is_available():
        assert registry.default_tree_backend("cuda") == "triton"


def test_packed_logprobs_through_triton_backend(monkeypatch):
    """End to end: a tiny Qwen2 (GQA, head dim 8) on the registered "triton" backend gives the log-probs
    and gradients of the "sdpa" backend."""
    from helpers import tiny_model
    from treerpo.attention import kernel_check
    from treerpo.policy.logprobs import packed_logprobs

    monkeypatch.setattr(kernel_check, "_enabled", False)  # counts the model's calls only (the check: test_kernel_check)
    assert registry._register_triton()
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("cache"))
        return triton_tree_backend(*args, **kwargs)

    monkeypatch.setitem(registry._BACKENDS["tree"], "triton", counted)
    rng = np.random.default_rng(5)
    batch = pack_trees([random_tree(rng, 5), random_tree(rng, 3, shape="chain")])
    model = tiny_model("qwen2").to(DEVICE)
    results = {}
    for backend in ("sdpa", "triton"):
        model.zero_grad()
        logp = packed_logprobs(model, batch, backend=backend)
        logp.sum().backward()
        results[backend] = (logp.detach(), [p.grad.clone() for p in model.parameters()])
    assert len(calls) == 2 and calls[0] is calls[1]  # both layers, one shared cache: one skip list
    assert sum(k[0] == "triton_skip" for k in calls[0]) == 1
    torch.testing.assert_close(results["triton"][0], results["sdpa"][0], atol=1e-4, rtol=0)
    for g_t, g_s in zip(results["triton"][1], results["sdpa"][1], strict=True):
        assert_close_normwise(g_t, g_s, rel=1e-4, floor=1e-4)


def test_registry_picks_triton_on_cuda_and_falls_back(monkeypatch, caplog):
    """The registry logic alone (no GPU needed): CUDA -> "triton" when it imports; when the import fails,
    one notice and "sdpa"."""
    import sys

    from treerpo.attention import optional_kernels

    cache, kernel = optional_kernels._import_cache, "treerpo.kernels.tree_attention"
    monkeypatch.delitem(cache, kernel, raising=False)
    assert registry.default_tree_backend("cuda") == "triton"
    assert registry.default_tree_backend("cpu") == "paths"
    monkeypatch.delitem(cache, kernel)  # forget the import (restored after the test)
    monkeypatch.setitem(sys.modules, kernel, None)  # import now raises ImportError
    with caplog.at_level("WARNING", logger=registry.__name__):
        assert registry.default_tree_backend(torch.device("cuda", 0)) == "sdpa"
        assert registry.default_tree_backend("cuda") == "sdpa"
    assert len([r for r in caplog.records if "Triton tree attention unavailable" in r.message]) == 1
