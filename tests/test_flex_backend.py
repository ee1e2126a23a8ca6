"""The FlexAttention tree backend (CPU: eager forward) against the SDPA reference; optional dense kernels."""

import logging

import numpy as np
import pytest
import torch

from helpers import random_tree
from treerpo.attention import flex_backend, get_tree_backend, optional_kernels, sdpa_tree_attention
from treerpo.attention.flex_backend import flex_tree_attention
from treerpo.trees.packing import pack_trees


def packed(seed, num_trees, nodes=8):
    rng = np.random.default_rng(seed)
    trees = [random_tree(rng, nodes, prompt_len=int(rng.integers(3, 20)), max_segment=30) for _ in range(num_trees)]
    return pack_trees(trees)


def qkv(n, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, hq, n, d, generator=g),
        torch.randn(1, hkv, n, d, generator=g),
        torch.randn(1, hkv, n, d, generator=g),
    )


def test_flex_registered():
    assert get_tree_backend("flex") is flex_tree_attention


@pytest.mark.parametrize("seed,num_trees,hq,hkv", [(0, 1, 4, 4), (1, 3, 4, 2), (2, 5, 8, 2)])
def test_flex_matches_sdpa(seed, num_trees, hq, hkv):
    batch = packed(seed, num_trees)
    n = batch.num_tokens
    assert n % 128  # exercises the padding
    q, k, v = qkv(n, hq, hkv, seed=seed)
    with torch.no_grad():
        ref = sdpa_tree_attention(q, k, v, batch.tin, batch.tout, scale=0.3)
        out = flex_tree_attention(q, k, v, batch.tin, batch.tout, scale=0.3, cache={})
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_default_scale_and_short_batch():
    batch = packed(3, 1, nodes=2)
    q, k, v = qkv(batch.num_tokens)
    with torch.no_grad():
        torch.testing.assert_close(
            flex_tree_attention(q, k, v, batch.tin, batch.tout),
            sdpa_tree_attention(q, k, v, batch.tin, batch.tout),
            atol=1e-5,
            rtol=1e-5,
        )


def test_flex_refuses_cpu_backward():
    batch = packed(4, 2)
    q, k, v = qkv(batch.num_tokens)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="paths"):
        flex_tree_attention(q, k, v, batch.tin, batch.tout)
    with torch.no_grad():  # forward-only is fine even with grad-requiring inputs
        flex_tree_attention(q, k, v, batch.tin, batch.tout)


def test_block_mask_built_once_per_batch(monkeypatch):
    calls = []
    real = flex_backend.build_block_mask
    monkeypatch.setattr(flex_backend, "build_block_mask", lambda *a: calls.append(1) or real(*a))
    batch = packed(5, 2)
    q, k, v = qkv(batch.num_tokens)
    cache = {}
    with torch.no_grad():
        for _layer in range(3):
            flex_tree_attention(q, k, v, batch.tin, batch.tout, cache=cache)
        assert len(calls) == 1
        assert cache["flex_block_mask"]["n_pad"] == flex_backend.padded_length(batch.num_tokens)
        other = packed(6, 2)
        q2, k2, v2 = qkv(other.num_tokens)
        flex_tree_attention(q2, k2, v2, other.tin, other.tout, cache={})
    assert len(calls) == 2


def naive_causal(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    s = q.shape[2]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def test_causal_prefix_cpu_falls_back_to_sdpa(caplog):
    assert optional_kernels.available_dense_kernels("cpu") == ["sdpa"]
    q, k, v = qkv(37, 8, 2)
    with caplog.at_level(logging.WARNING, logger=optional_kernels.__name__):
        out = optional_kernels.causal_prefix_attention(q, k, v, scale=0.2)
    torch.testing.assert_close(out, naive_causal(q, k, v, 0.2), atol=1e-5, rtol=1e-5)
    assert not caplog.records  # no notice on CPU


def test_causal_prefix_notice_once_on_cuda_without_kernels(monkeypatch, caplog):
    monkeypatch.setattr(optional_kernels, "_is_cuda", lambda device: True)
    monkeypatch.setattr(optional_kernels, "_notice_logged", False)
    monkeypatch.setattr(optional_kernels, "_import_cache", {"flash_attn": None, "xformers.ops": None})
    assert optional_kernels.available_dense_kernels("cuda") == ["sdpa"]
    q, k, v = qkv(9)
    with caplog.at_level(logging.WARNING, logger=optional_kernels.__name__):
        for _ in range(3):
            out = optional_kernels.causal_prefix_attention(q, k, v, scale=0.25)
    notices = [r for r in caplog.records if "SDPA" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    torch.testing.assert_close(out, naive_causal(q, k, v, 0.25), atol=1e-5, rtol=1e-5)


def test_causal_prefix_prefers_installed_kernels(monkeypatch):
    class FakeFlash:
        @staticmethod
        def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
            assert causal and q.shape[2] == 4  # [B, S, H, D]
            return torch.zeros_like(q)

    monkeypatch.setattr(optional_kernels, "_is_cuda", lambda device: True)
    monkeypatch.setattr(optional_kernels, "_import_cache", {"flash_attn": FakeFlash, "xformers.ops": None})
    assert optional_kernels.available_dense_kernels("cuda") == ["flash_attn", "sdpa"]
    q, k, v = (t.half() for t in qkv(5))
    assert torch.equal(optional_kernels.causal_prefix_attention(q, k, v), torch.zeros_like(q))
