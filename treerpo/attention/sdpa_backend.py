"""Reference tree attention: PyTorch SDPA with a dense boolean mask built from the Euler intervals.

It is O(N^2) in memory, the ground truth for tests and the CPU training path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def interval_mask(tin: torch.Tensor, tout: torch.Tensor) -> torch.Tensor:
    """[N, N] bool: query row q sees key column k iff tin[k] <= tin[q] < tout[k]."""
    q = tin[:, None]
    return (tin[None, :] <= q) & (q < tout[None, :])


def sdpa_tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tin: torch.Tensor,
                        tout: torch.Tensor, scale: float | None = None, cache: dict | None = None) -> torch.Tensor:
    """query [B, Hq, N, D], key/value [B, Hkv, N, D] -> [B, Hq, N, D]."""
    mask = cache.get("dense_mask") if cache is not None else None
    if mask is None:
        mask = interval_mask(tin.to(query.device), tout.to(query.device))
        if cache is not None:
            cache["dense_mask"] = mask
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
