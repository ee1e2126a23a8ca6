"""Tree attention over gathered ancestor paths: the CPU training path, cost ~ visible pairs, not tree size squared.

A packed tree is cut into *chunks*: runs of at most ``chunk`` consecutive tokens where each token is
the child of the one before (so inside a chunk the mask is causal). A chunk's keys are its ancestor
path (gathered once per forward by index, shared by every layer) followed by its own tokens. All
chunks run as one batched SDPA with a small padded mask ``[chunks, chunk, longest path]``, so a GRPO
tree (a prompt and G answers) costs about G * answer * (prompt + answer) pairs instead of the dense
mask's (prompt + G * answer) squared. Autograd flows through the gathers (index_select's backward adds
the key/value gradients of every chunk that read a token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from treerpo.attention.features import NONE, AttentionFeatures, attend

DEFAULT_CHUNK = 16


@dataclass
class PathChunks:
    key_index: torch.Tensor  # long [R, K]: token of each chunk's j-th key (padding: 0)
    query_index: torch.Tensor  # long [R, C]: token of each chunk's i-th query (padding: 0)
    query_key_pos: torch.Tensor  # long [R, C]: index in key_index of the query itself (key j visible iff j <= it)
    order: torch.Tensor  # long [N]: flat (chunk, row) position of every token's query, in token order


def _run_paths(tin: np.ndarray, tout: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """(ancestor tokens, start, end) of each run of tokens that continue one another's path."""
    n = len(tin)
    starts = np.flatnonzero(np.concatenate([[True], tin[1:] >= tout[:-1]]))
    ends = np.append(starts[1:], n)
    runs, prev_path = [], np.zeros(0, dtype=np.int64)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        # the parent is the deepest token on the previous token's path whose subtree holds ``start``;
        # subtree ends shrink down a path, so it is found by binary search
        keep = int(np.searchsorted(-tout[prev_path], -start, side="left")) if len(prev_path) else 0
        ancestors = prev_path[:keep]
        runs.append((ancestors, start, end))
        prev_path = np.concatenate([ancestors, np.arange(start, end)])
    return runs


def build_path_chunks(tin: torch.Tensor, tout: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> PathChunks:
    base = int(tin[0]) if len(tin) else 0
    tin_np = tin.cpu().numpy().astype(np.int64) - base
    tout_np = tout.cpu().numpy().astype(np.int64) - base
    keys, queries = [], []
    for ancestors, start, end in _run_paths(tin_np, tout_np):
        for lo in range(start, end, chunk):
            hi = min(lo + chunk, end)
            keys.append(np.concatenate([ancestors, np.arange(start, hi)]))
            queries.append((lo, hi, len(ancestors) + lo - start))
    rows, width = len(keys), max(len(k) for k in keys)
    key_index = np.zeros((rows, width), dtype=np.int64)
    query_index = np.zeros((rows, chunk), dtype=np.int64)
    query_key_pos = np.zeros((rows, chunk), dtype=np.int64)
    order = np.empty(len(tin_np), dtype=np.int64)
    for r, (k, (lo, hi, first_pos)) in enumerate(zip(keys, queries, strict=True)):
        key_index[r, : len(k)] = k
        query_index[r, : hi - lo] = np.arange(lo, hi)
        query_key_pos[r, : hi - lo] = first_pos + np.arange(hi - lo)
        order[lo:hi] = r * chunk + np.arange(hi - lo)
    device = tin.device
    return PathChunks(*(torch.from_numpy(a).to(device) for a in (key_index, query_index, query_key_pos, order)))


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [H, N, D] at index [R, L] -> [R, H, L, D]."""
    r, length = index.shape
    return x.index_select(1, index.reshape(-1)).view(x.shape[0], r, length, x.shape[2]).transpose(0, 1)


def paths_tree_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tin: torch.Tensor,
    tout: torch.Tensor,
    scale: float | None = None,
    cache: dict | None = None,
    chunk: int = DEFAULT_CHUNK,
    features: AttentionFeatures = NONE,
) -> torch.Tensor:
    """query [1, Hq, N, D], key/value [1, Hkv, N, D] -> [1, Hq, N, D]. ``features``: a window (key j of a chunk's
    path is at position j), soft-capping and sinks (``features.attend``)."""
    if query.shape[0] != 1:
        raise ValueError(f"the paths backend takes one packed row; got batch size {query.shape[0]}")
    if query.shape[2] == 0:
        return query.clone()
    chunks = cache.get(("path_chunks", chunk)) if cache is not None else None
    if chunks is None:
        chunks = build_path_chunks(tin, tout, chunk)
        if cache is not None:
            cache[("path_chunks", chunk)] = chunks
    q = _gather_rows(query[0], chunks.query_index)  # [R, Hq, C, D]
    k = _gather_rows(key[0], chunks.key_index)  # [R, Hkv, K, D]
    v = _gather_rows(value[0], chunks.key_index)
    key_pos = torch.arange(k.shape[2], device=query.device)
    visible = key_pos[None, None, :] <= chunks.query_key_pos[:, :, None]  # [R, C, K]
    if features.window:
        visible &= key_pos[None, None, :] > chunks.query_key_pos[:, :, None] - features.window
    if features.changes_scores:
        out = attend(q, k, v, visible[:, None], scale, features)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible[:, None], scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )  # [R, Hq, C, D]
    hq, d = out.shape[1], out.shape[3]
    flat = out.transpose(0, 1).reshape(hq, -1, d)  # [Hq, R*C, D]
    return flat.index_select(1, chunks.order)[None]
