"""Reference tree attention: PyTorch SDPA with a dense boolean mask built from the Euler intervals.

The mask is dense per tree: a batch of several trees is cut at tree boundaries (no token
sees another tree), so the cost is the sum of the squares of the tree sizes, not the square
of the batch. The ground truth for tests and the CPU training path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treerpo.attention.features import NONE, AttentionFeatures, attend, window_mask


def interval_mask(tin: torch.Tensor, tout: torch.Tensor) -> torch.Tensor:
    """[N, N] bool: query row q sees key column k iff tin[k] <= tin[q] < tout[k]."""
    q = tin[:, None]
    return (tin[None, :] <= q) & (q < tout[None, :])


def tree_blocks(tin: torch.Tensor, tout: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each tree: a tree's first token's subtree is the whole tree."""
    tin_list, tout_list = tin.tolist(), tout.tolist()
    blocks, start = [], 0
    while start < len(tin_list):
        end = tout_list[start] - tin_list[0]
        blocks.append((start, end))
        start = end
    return blocks


def _block_masks(tin: torch.Tensor, tout: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    return [(s, e, interval_mask(tin[s:e], tout[s:e])) for s, e in tree_blocks(tin, tout)]


def sdpa_tree_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tin: torch.Tensor,
    tout: torch.Tensor,
    scale: float | None = None,
    cache: dict | None = None,
    features: AttentionFeatures = NONE,
) -> torch.Tensor:
    """query [B, Hq, N, D], key/value [B, Hkv, N, D] -> [B, Hq, N, D]. ``features``: a window (a key's position is
    its ancestor count, the mask's row sum), soft-capping and sinks (``features.attend``)."""
    blocks = cache.get("sdpa_blocks") if cache is not None else None
    if blocks is None:
        blocks = _block_masks(tin.to(query.device), tout.to(query.device))
        if cache is not None:
            cache["sdpa_blocks"] = blocks
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for s, e, mask in blocks:
        positions = mask.sum(-1) - 1
        window = window_mask(positions, positions, features.window)
        visible = mask if window is None else mask & window
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        if features.changes_scores:
            outs.append(attend(q, k, v, visible, scale, features))
        else:
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
