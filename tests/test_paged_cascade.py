"""Cascade decode in the PyTorch paged backend: sibling groups read their shared prefix once.

Checked against the plain paged path (each sequence over its whole path) and against an independent
per-sequence softmax over the path's keys; then through ``ModelRunner.forward`` on a tiny model.
"""

import numpy as np
import pytest
import torch

from helpers import SequenceStep, SharedPrefixes, cascade_pays, runner_logits, tiny_model
from treerpo.attention import registry
from treerpo.attention.paged import PagedAttentionMetadata, paged_attention_torch
from treerpo.engine.kv_pool import KVPool
from treerpo.engine.model_runner import ModelRunner, kv_shape

POOL_SLOTS = 256
NEW_SLOTS_FROM = 200  # new tokens get slots 200.. (distinct); cached paths draw from 0..199
LAYER = type("Attn", (), {"layer_idx": 0})()


def random_decode_groups(seed, hq=6, hkv=2, d=16, dtype=torch.float32, device="cpu"):
    """A pool of random K/V and a decode step shaped like trees: group 0's prefix is a prompt, later groups
    extend an earlier group's prefix (shared pages), the last group is a one-slot prefix with one member;
    some members have no cached suffix (only their new token).

    Returns (pool, prefixes, group_of_seq, suffixes, new_slots, q, k, v); q [1, Hq, B, D], k/v [1, Hkv, B, D]."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    pool = KVPool(1, hkv, d, dtype, device, num_pages=POOL_SLOTS)
    pool.k[0].copy_(torch.randn(POOL_SLOTS, hkv, d, generator=gen))
    pool.v[0].copy_(torch.randn(POOL_SLOTS, hkv, d, generator=gen))
    cached = lambda n: rng.integers(0, NEW_SLOTS_FROM, size=n)  # noqa: E731
    prefixes = [cached(int(rng.integers(1, 12)))]
    for _ in range(int(rng.integers(1, 4))):
        base = prefixes[int(rng.integers(len(prefixes)))]
        prefixes.append(np.concatenate([base, cached(int(rng.integers(1, 9)))]))
    prefixes.append(cached(1))
    counts = rng.integers(1, 4, size=len(prefixes))
    counts[-1] = 1
    group_of_seq = rng.permutation(np.repeat(np.arange(len(prefixes)), counts))
    suffixes = [cached(int(n)) for n in rng.integers(0, 7, size=len(group_of_seq))]
    suffixes[0] = suffixes[0][:0]
    b = len(group_of_seq)
    new_slots = np.arange(NEW_SLOTS_FROM, NEW_SLOTS_FROM + b)
    q = torch.randn(1, hq, b, d, generator=gen).to(device, dtype)
    k = torch.randn(1, hkv, b, d, generator=gen).to(device, dtype)
    v = torch.randn(1, hkv, b, d, generator=gen).to(device, dtype)
    return pool, prefixes, group_of_seq, suffixes, new_slots, q, k, v


def cascade_and_plain_metadata(pool, prefixes, group_of_seq, suffixes, new_slots, device="cpu"):
    steps = [(suffix, new_slots[i : i + 1]) for i, suffix in enumerate(suffixes)]
    cascade = PagedAttentionMetadata.build(pool, steps, device, prefixes, group_of_seq)
    full = [(np.concatenate([prefixes[g], suffix]), new) for g, (suffix, new) in zip(group_of_seq, steps, strict=True)]
    return cascade, PagedAttentionMetadata.build(pool, full, device)


def reference(pool, prefixes, group_of_seq, suffixes, new_slots, q, k, v, scale):
    """fp32, one sequence at a time: softmax over the keys of prefix + suffix + new token -> [1, B, Hq, D]."""
    keys, values = pool.k[0].float().clone(), pool.v[0].float().clone()
    keys[torch.from_numpy(new_slots)] = k[0].transpose(0, 1).float()
    values[torch.from_numpy(new_slots)] = v[0].transpose(0, 1).float()
    hq, d = q.shape[1], q.shape[3]
    rep = hq // keys.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = []
    for b, g in enumerate(group_of_seq):
        path = torch.from_numpy(np.concatenate([prefixes[g], suffixes[b], new_slots[b : b + 1]]))
        kb = keys[path].repeat_interleave(rep, 1)  # [n, Hq, D]
        vb = values[path].repeat_interleave(rep, 1)
        weights = (torch.einsum("hd,nhd->hn", q[0, :, b].float(), kb) * scale).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", weights, vb))
    return torch.stack(out)[None]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [None, 0.37])
def test_cascade_equals_the_plain_path_and_the_reference(seed, scale):
    case = random_decode_groups(seed, hq=6 if seed % 2 else 4, hkv=2 if seed % 3 else 1)
    pool, prefixes, group_of_seq, suffixes, new_slots, q, k, v = case
    cascade_meta, plain_meta = cascade_and_plain_metadata(pool, prefixes, group_of_seq, suffixes, new_slots)
    assert cascade_meta.groups is not None and plain_meta.groups is None
    expected = reference(*case, scale)
    plain = paged_attention_torch(LAYER, q, k, v, plain_meta, scale)
    cascade = paged_attention_torch(LAYER, q, k, v, cascade_meta, scale)
    assert cascade.shape == plain.shape == (1, len(group_of_seq), q.shape[1], q.shape[3])
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cascade, expected, atol=1e-5, rtol=0)


def test_cascade_in_bf16_stays_close_to_the_fp32_reference():
    case = random_decode_groups(11, dtype=torch.bfloat16)
    pool, prefixes, group_of_seq, suffixes, new_slots, q, k, v = case
    cascade_meta, _ = cascade_and_plain_metadata(pool, prefixes, group_of_seq, suffixes, new_slots)
    out = paged_attention_torch(LAYER, q, k, v, cascade_meta, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(*case, None), atol=3e-2, rtol=0)


def test_group_tables_list_every_member_once():
    _, prefixes, group_of_seq, *_ = random_decode_groups(3)
    pool = KVPool(1, 1, 4, num_pages=POOL_SLOTS)
    meta = PagedAttentionMetadata.build(
        pool, [([], [NEW_SLOTS_FROM + i]) for i in range(len(group_of_seq))], "cpu", prefixes, group_of_seq
    )
    g = meta.groups
    rows = g.member_rows.numpy()
    for group in range(len(prefixes)):
        expected = np.flatnonzero(group_of_seq == group)
        assert rows[group, : len(expected)].tolist() == expected.tolist()
        start, end = g.member_start[group : group + 2].tolist()
        assert g.members[start:end].tolist() == expected.tolist()
        assert g.prefix_slots[group, : len(prefixes[group])].tolist() == prefixes[group].tolist()
    assert (rows[group_of_seq, g.rank_in_group.numpy()] == np.arange(len(group_of_seq))).all()
    assert g.prefix_len.tolist() == [len(p) for p in prefixes]


def test_groups_are_refused_outside_decode_and_without_a_prefix():
    pool = KVPool(1, 1, 4, num_pages=16)
    with pytest.raises(ValueError, match="decode"):
        PagedAttentionMetadata.build(pool, [([], [5, 6])], "cpu", [np.array([1])], [0])
    with pytest.raises(ValueError, match="at least one slot"):
        PagedAttentionMetadata.build(pool, [([], [5])], "cpu", [np.array([], dtype=np.int64)], [0])
    with pytest.raises(ValueError, match="group_of_seq"):
        PagedAttentionMetadata.build(pool, [([], [5])], "cpu", [np.array([1])], [1])


def spy_on_groups(monkeypatch) -> list[bool]:
    """Record, for every layer call of the torch paged backend, whether the metadata carried groups."""
    seen = []

    def spy(module, query, key, value, meta, scale):
        seen.append(meta.groups is not None)
        return paged_attention_torch(module, query, key, value, meta, scale)

    monkeypatch.setitem(registry._BACKENDS["paged"], "torch", spy)
    return seen


def test_runner_decode_with_shared_prefixes_equals_whole_paths(monkeypatch):
    """Prefill a prompt and a child segment, then decode siblings of both levels three steps: logits with the
    shared prefixes equal those over whole paths (positions and attention both follow the full path)."""
    seen = spy_on_groups(monkeypatch)
    model = tiny_model()
    layers, kv_heads, head_dim = kv_shape(model.config)
    rng = np.random.default_rng(0)
    prompt, segment = rng.integers(1, 40, size=7).tolist(), rng.integers(1, 40, size=4).tolist()
    tokens = rng.integers(1, 40, size=(3, 5)).tolist()  # per step, the new token of each of 5 sequences
    logits = {}
    for cascade in (False, True):
        pool = KVPool(layers, kv_heads, head_dim, num_pages=128)
        runner = ModelRunner(model, pool)
        root = pool.alloc(len(prompt)).numpy()
        runner_logits(runner, [SequenceStep(root[:0], prompt, root)])
        child = np.concatenate([root, pool.alloc(len(segment)).numpy()])
        runner_logits(runner, [SequenceStep(root, segment, child[len(root) :])])
        prefixes, group_of_seq = [root, child], np.array([0, 1, 0, 1, 1])
        own = [np.zeros(0, dtype=np.int64) for _ in group_of_seq]
        out = []
        for step in tokens:
            new = pool.alloc(len(step)).numpy()
            if cascade:
                steps = [SequenceStep(own[i], [t], new[i : i + 1]) for i, t in enumerate(step)]
                out.append(runner_logits(runner, steps, SharedPrefixes(prefixes, group_of_seq)))
            else:
                steps = [
                    SequenceStep(np.concatenate([prefixes[g], own[i]]), [t], new[i : i + 1])
                    for i, (g, t) in enumerate(zip(group_of_seq, step, strict=True))
                ]
                out.append(runner_logits(runner, steps))
            own = [np.append(o, new[i]) for i, o in enumerate(own)]
        logits[cascade] = torch.cat(out)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
    decode_calls = 3 * layers
    assert seen[-decode_calls:] == [True] * decode_calls


def test_the_cascade_pays_from_the_kv_bytes_it_spares():
    """Groups of 3 and 1 sequences over prefixes of 10 and 4 slots: 2 x 10 prefix keys are not re-read."""
    model = tiny_model()
    layers, kv_heads, head_dim = kv_shape(model.config)
    runner = ModelRunner(model, KVPool(layers, kv_heads, head_dim, num_pages=64))
    shared = SharedPrefixes([np.arange(10), np.arange(20, 24)], np.array([0, 1, 0, 0]))
    spared = 20 * 2 * kv_heads * head_dim * 4  # K and V, fp32, per layer
    runner.cascade_min_saved_bytes = spared
    assert cascade_pays(runner, shared)
    runner.cascade_min_saved_bytes = spared + 1
    assert not cascade_pays(runner, shared)
