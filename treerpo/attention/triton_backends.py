"""The Triton kernels (``treerpo.kernels``) as the "triton" tree and paged backends.

The kernels take tensors only; this module turns the project's objects into their arguments:

* tree attention (``triton_tree_backend``, the signature of every tree backend): the tile skip list of the
  batch's intervals (``treerpo.trees.tile_skip``) and its transpose, computed once per batch for the kernel's tile
  size and kept in the forward's ``cache``, so every head and layer shares them;
* paged attention (``paged_decode_backend``, ``paged_attention_torch``'s signature and result): a decode
  forward (one new token per sequence) writes the new K/V into the pool as the PyTorch reference does, then
  runs the plain paged kernel, or the cascade when the metadata carries the step's sibling groups
  (``PagedAttentionMetadata.groups``: each sequence's ``kv_slots`` are then its suffix); a prefill forward
  is ``paged_attention_torch``.

Importing this module imports triton; ``registry.py`` imports it only once the kernels have imported.
"""

from __future__ import annotations

import torch

from treerpo.attention.paged import PagedAttentionMetadata, paged_attention_torch
from treerpo.kernels import paged_decode
from treerpo.kernels.tree_attention import block_config, triton_tree_attention
from treerpo.trees.tile_skip import tile_skip

SKIP_CACHE_KEY = "triton_skip"


# ------------------------------------------------------------------------------------------ tree attention
def transpose_skip(offsets: torch.Tensor, key_tiles: torch.Tensor, num_k_tiles: int):
    """CSR by query tile -> CSR by key tile: ``(q_offsets int64 [num_k_tiles + 1], q_tiles int32)``,
    the query tiles of each key tile ascending."""
    offsets = offsets.long()
    num_q = offsets.numel() - 1
    q_of_pair = torch.repeat_interleave(torch.arange(num_q, device=offsets.device), offsets.diff())
    order = torch.sort(key_tiles.long(), stable=True).indices  # pairs are ascending by query tile: stable keeps it
    counts = torch.bincount(key_tiles.long(), minlength=num_k_tiles)
    q_offsets = torch.zeros(num_k_tiles + 1, dtype=torch.long, device=offsets.device)
    torch.cumsum(counts, 0, out=q_offsets[1:])
    return q_offsets, q_of_pair[order].to(torch.int32)


def skip_lists(tin: torch.Tensor, tout: torch.Tensor, block: int, device, cache: dict | None) -> dict:
    """The kernel's tensors for tiles of ``block`` rows: ``tin``/``tout`` (int32), the skip list
    (``offsets``, ``key_tiles``) and its transpose (``q_offsets``, ``q_tiles``), on ``device``; kept in
    ``cache`` under ``(SKIP_CACHE_KEY, block, device)``."""
    key = (SKIP_CACHE_KEY, block, str(device))
    if cache is not None and key in cache:
        return cache[key]
    n = tin.numel()
    offsets, key_tiles = tile_skip(tin.cpu(), tout.cpu(), block, block)
    q_offsets, q_tiles = transpose_skip(offsets, key_tiles, -(-n // block))
    lists = {
        "tin": tin.to(device=device, dtype=torch.int32).contiguous(),
        "tout": tout.to(device=device, dtype=torch.int32).contiguous(),
        "offsets": offsets.to(device),
        "key_tiles": key_tiles.to(device),
        "q_offsets": q_offsets.to(device),
        "q_tiles": q_tiles.to(device),
    }
    if cache is not None:
        cache[key] = lists
    return lists


def triton_tree_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tin: torch.Tensor,
    tout: torch.Tensor,
    scale: float | None = None,
    cache: dict | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """The "triton" tree backend: query [B, Hq, N, D], key/value [B, Hkv, N, D] -> [B, Hq, N, D].

    ``cache`` (a dict shared by the layers of one forward) keeps the skip lists, so they are computed once
    per batch. ``block`` overrides the tile size (queries and keys alike)."""
    default_block, num_warps = block_config(query.shape[3], query.shape[2])
    block = block or default_block
    lists = skip_lists(tin, tout, block, query.device, cache)
    return triton_tree_attention(
        query,
        key,
        value,
        lists["tin"],
        lists["tout"],
        lists["offsets"],
        lists["key_tiles"],
        lists["q_offsets"],
        lists["q_tiles"],
        block,
        scale=scale,
        num_warps=num_warps,
    )


# ----------------------------------------------------------------------------------------- paged attention
def cascade_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMetadata, scale: float | None
) -> torch.Tensor:
    """Cascade decode over the engine's metadata: ``meta.kv_slots`` are the suffixes, ``meta.groups`` the
    prefixes and their members, precomputed once per forward (no host sync per layer) -> out [B, Hq, D]."""
    g = meta.groups
    return paged_decode.cascade_decode_grouped(
        q,
        k_cache,
        v_cache,
        meta.kv_slots,
        meta.query_key_pos[:, 0] + 1,
        g.prefix_slots,
        g.prefix_len,
        g.members,
        g.member_start,
        g.member_rows.shape[1],
        scale=scale,
    )


def paged_decode_backend(module, query, key, value, meta: PagedAttentionMetadata, scale):
    """The "triton" paged backend: ``paged_attention_torch``'s signature and result; decode forwards (one new
    token per sequence) run ``paged_decode_attention``, or the cascade when the metadata carries sibling groups
    (``meta.groups``); prefill forwards the PyTorch reference."""
    if meta.query_rows.shape[1] != 1:
        return paged_attention_torch(module, query, key, value, meta, scale)
    layer = module.layer_idx
    meta.pool.write(layer, meta.write_slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    rows = meta.query_rows[:, 0]
    q = query[0].transpose(0, 1)[rows]  # [B, Hq, D]
    if meta.groups is not None:
        out = cascade_decode(q, meta.pool.k[layer], meta.pool.v[layer], meta, scale)
    else:
        kv_len = meta.query_key_pos[:, 0] + 1
        out = paged_decode.paged_decode_attention(
            q, meta.pool.k[layer], meta.pool.v[layer], meta.kv_slots, kv_len, scale=scale
        )
    packed = query.new_empty((query.shape[2], query.shape[1], query.shape[3]))
    packed[rows] = out.to(query.dtype)
    return packed[None]
