"""The paths tree attention (chunks over gathered ancestor paths) against the dense-mask SDPA reference."""

import numpy as np
import pytest
import torch

from helpers import random_tree
from treerpo.attention.paths_backend import _run_paths, build_path_chunks, paths_tree_attention
from treerpo.attention.sdpa_backend import interval_mask, sdpa_tree_attention
from treerpo.trees.packing import pack_trees


def _batches():
    rng = np.random.default_rng(7)
    yield "single_node", [random_tree(rng, 0, prompt_len=5)]
    yield "chain", [random_tree(rng, 20, shape="chain", prompt_len=3, max_segment=4)]
    yield "fan", [random_tree(rng, 25, shape="fan", prompt_len=4, max_segment=9)]
    yield (
        "several",
        [
            random_tree(rng, 6),
            random_tree(rng, 4, shape="chain"),
            random_tree(rng, 0),
            random_tree(rng, 7, shape="fan"),
            random_tree(rng, 30, max_segment=40),
        ],
    )


@pytest.mark.parametrize("name,trees", list(_batches()), ids=[n for n, _ in _batches()])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_paths_visibility_equals_the_interval_mask(name, trees, chunk):
    batch = pack_trees(trees)
    n = batch.num_tokens
    c = build_path_chunks(batch.tin, batch.tout, chunk)
    seen = torch.zeros(n, n, dtype=torch.bool)
    width = c.key_index.shape[1]
    visible = torch.arange(width)[None, None, :] <= c.query_key_pos[:, :, None]
    flat_query = c.query_index.reshape(-1)[c.order]  # the query row each token's output comes from
    assert torch.equal(flat_query, torch.arange(n))
    rows, cols = c.order // c.query_index.shape[1], c.order % c.query_index.shape[1]
    for token, (r, i) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        seen[token, c.key_index[r][visible[r, i]]] = True
        assert len(set(c.key_index[r][visible[r, i]].tolist())) == int(visible[r, i].sum())  # no key twice
    assert torch.equal(seen, interval_mask(batch.tin, batch.tout))


@pytest.mark.parametrize("name,trees", list(_batches()), ids=[n for n, _ in _batches()])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_paths_matches_dense_sdpa_forward_and_backward(name, trees, hq, hkv):
    batch = pack_trees(trees)
    n, d = batch.num_tokens, 8
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, n, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    grad = torch.randn(1, hq, n, d, generator=gen, dtype=torch.float64)
    outs = []
    for fn in (paths_tree_attention, sdpa_tree_attention):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, batch.tin, batch.tout, scale=0.3, cache={})
        outs.append((out, torch.autograd.grad(out, leaves, grad)))
    (out, grads), (ref, ref_grads) = outs
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_run_ancestors_of_a_hand_built_tree():
    # prompt [0,1], child A [2,3] with child A1 [4], then child B [5]: B's ancestors are the prompt only
    tin = np.arange(6)
    tout = np.array([6, 6, 5, 5, 5, 6])
    runs = [(a.tolist(), s, e) for a, s, e in _run_paths(tin, tout)]
    assert runs == [([], 0, 5), ([0, 1], 5, 6)]


def test_cache_is_reused_across_layers():
    batch = pack_trees([random_tree(np.random.default_rng(0), 5)])
    n = batch.num_tokens
    cache = {}
    x = torch.randn(1, 2, n, 4)
    paths_tree_attention(x, x, x, batch.tin, batch.tout, cache=cache)
    built = cache[("path_chunks", 16)]
    paths_tree_attention(x, x, x, batch.tin, batch.tout, cache=cache)
    assert cache[("path_chunks", 16)] is built


def test_empty_batch_and_offset_intervals():
    empty = torch.zeros(1, 2, 0, 4)
    assert paths_tree_attention(
        empty, empty, empty, torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    ).shape == (1, 2, 0, 4)
    batch = pack_trees([random_tree(np.random.default_rng(2), 6)])
    x = torch.randn(1, 2, batch.num_tokens, 4, dtype=torch.float64)
    shifted = [paths_tree_attention(x, x, x, batch.tin + base, batch.tout + base, cache={}) for base in (0, 100)]
    torch.testing.assert_close(shifted[0], shifted[1])
    torch.testing.assert_close(shifted[0], sdpa_tree_attention(x, x, x, batch.tin, batch.tout))
