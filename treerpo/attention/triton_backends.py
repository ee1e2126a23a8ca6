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
from treerpo.attention.triton_autotune import autotune_tree_tiles
from treerpo.kernels import paged_decode
from treerpo.kernels.tile_configs import TreeTiles, autotune_enabled, length_bucket, tree_tiles
from treerpo.kernels.tree_attention import check_inputs, triton_tree_attention
from treerpo.trees.tile_skip import tile_skip

SKIP_CACHE_KEY = "triton_skip"
TILES_CACHE_KEY = "triton_tiles"


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


def skip_lists(
    tin: torch.Tensor, tout: torch.Tensor, block: int, device, cache: dict | None, block_k: int | None = None
) -> dict:
    """The kernels' tensors for query tiles of ``block`` rows and key tiles of ``block_k`` (default ``block``):
    ``tin``/``tout`` (int32), the skip list (``offsets``, ``key_tiles``) and its transpose (``q_offsets``,
    ``q_tiles``), on ``device``; kept in ``cache`` under ``(SKIP_CACHE_KEY, block, block_k, device)``."""
    block_k = block_k or block
    key = (SKIP_CACHE_KEY, block, block_k, str(device))
    if cache is not None and key in cache:
        return cache[key]
    n = tin.numel()
    offsets, key_tiles = tile_skip(tin.cpu(), tout.cpu(), block, block_k)
    q_offsets, q_tiles = transpose_skip(offsets, key_tiles, -(-n // block_k))
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


def _skips(tin, tout, tiles: TreeTiles, group: int, device, cache: dict | None):
    """The kernel's ``skips`` for ``tiles``: (tin, tout, forward CSR, dK/dV transposed CSR, dQ CSR)."""
    fwd, dkdv, dq = (skip_lists(tin, tout, c.rows(group), device, cache, c.block_n) for c in tiles.as_tuple())
    return (
        fwd["tin"],
        fwd["tout"],
        (fwd["offsets"], fwd["key_tiles"]),
        (dkdv["q_offsets"], dkdv["q_tiles"]),
        (dq["offsets"], dq["key_tiles"]),
    )


def triton_tree_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tin: torch.Tensor,
    tout: torch.Tensor,
    scale: float | None = None,
    cache: dict | None = None,
    tiles: TreeTiles | None = None,
) -> torch.Tensor:
    """The "triton" tree backend: query [B, Hq, N, D], key/value [B, Hkv, N, D] -> [B, Hq, N, D].

    ``cache`` (a dict shared by the layers of one forward) keeps the skip lists, so they are computed once
    per batch. ``tiles`` overrides the kernels' configurations (``tile_configs.tree_tiles`` by default, or the
    autotuned choice with ``TREERPO_TRITON_AUTOTUNE=1`` on a GPU)."""
    check_inputs(query, key, tin, tout)
    group = query.shape[1] // key.shape[1]
    if tiles is None:
        tiles = _forward_tiles(query, key, value, tin, tout, scale, cache)
    tiles = tiles.for_group(group)
    skips = _skips(tin, tout, tiles, group, query.device, cache)
    return triton_tree_attention(query, key, value, *skips, tiles, scale=scale)


def _forward_tiles(query, key, value, tin, tout, scale, cache) -> TreeTiles:
    """``tuned_tiles``, resolved once per forward (kept in ``cache`` beside the skip lists) rather than per layer."""
    if cache is None:
        return tuned_tiles(query, key, value, tin, tout, scale, cache)
    key_ = (TILES_CACHE_KEY, query.shape[1], key.shape[1], query.shape[3], query.dtype, str(query.device))
    if key_ not in cache:
        cache[key_] = tuned_tiles(query, key, value, tin, tout, scale, cache)
    return cache[key_]


def tuned_tiles(query, key, value, tin, tout, scale, cache) -> TreeTiles:
    """``tree_tiles``'s configuration, or with autotuning on (a GPU, ``TREERPO_TRITON_AUTOTUNE=1``) the fastest of
    ``candidates`` for this (head dim, dtype, group, length bucket), timed once per process."""
    d, group = query.shape[3], query.shape[1] // key.shape[1]
    base = tree_tiles(d, group, query.device)
    if not autotune_enabled(query.device):
        return base
    tune_key = (d, query.dtype, group, length_bucket(query.shape[2]), str(query.device))
    if tune_key not in _TUNED:
        _TUNED[tune_key] = autotune_tree_tiles(
            lambda tiles, backward: _trial(query, key, value, tin, tout, scale, cache, tiles, backward),
            query,
            key,
            base,
        )
    return _TUNED[tune_key]


@torch.enable_grad()
def _trial(query, key, value, tin, tout, scale, cache, tiles: TreeTiles, backward: bool) -> None:
    """One timed run of the attention on copies of the inputs (the caller's graph untouched)."""
    leaves = [x.detach().requires_grad_(backward) for x in (query, key, value)]
    out = triton_tree_backend(*leaves, tin, tout, scale=scale, cache=cache, tiles=tiles)
    if backward:
        torch.autograd.grad(out, leaves, torch.ones_like(out))


_TUNED: dict[tuple, TreeTiles] = {}


# ----------------------------------------------------------------------------------------- paged attention
def decode_constants(meta: PagedAttentionMetadata, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys a row, ``arange(B + 1)``, int64 zeros for a row and a group): the same at every layer of a forward."""

    def make():
        b = q.shape[0]
        groups = 0 if meta.groups is None else meta.groups.prefix_len.shape[0]
        kv_len = meta.query_key_pos[:, 0] + 1
        rows = torch.arange(b + 1, device=q.device, dtype=torch.int64)
        return kv_len, rows, torch.zeros(max(b, groups), device=q.device, dtype=torch.int64)

    return meta.per_forward("triton_decode", make)


def cascade_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMetadata, scale: float | None
) -> torch.Tensor:
    """Cascade decode over the engine's metadata: ``meta.kv_slots`` are the suffixes, ``meta.groups`` the
    prefixes and their members, precomputed once per forward (no host sync per layer) -> out [B, Hq, D]."""
    g = meta.groups
    kv_len, rows, zeros = decode_constants(meta, q)
    return paged_decode.cascade_decode_grouped(
        q,
        k_cache,
        v_cache,
        meta.kv_slots,
        kv_len,
        g.prefix_slots,
        g.prefix_len,
        g.members,
        g.member_start,
        g.member_rows.shape[1],
        scale=scale,
        rows=rows,
        zeros=zeros,
    )


def paged_decode_backend(module, query, key, value, meta: PagedAttentionMetadata, scale):
    """The "triton" paged backend: ``paged_attention_torch``'s signature and result; decode forwards (one new
    token per sequence, sequence b at packed row b) run ``paged_decode_attention``, or the cascade when the metadata
    carries sibling groups (``meta.groups``); prefill forwards the PyTorch reference."""
    if meta.query_rows.shape[1] != 1:
        return paged_attention_torch(module, query, key, value, meta, scale)
    layer = module.layer_idx
    meta.pool.write(layer, meta.write_slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)  # [B, Hq, D], read in place through its strides
    if meta.groups is not None:
        out = cascade_decode(q, meta.pool.k[layer], meta.pool.v[layer], meta, scale)
    else:
        kv_len, rows, zeros = decode_constants(meta, q)
        out = paged_decode.paged_decode_attention(
            q, meta.pool.k[layer], meta.pool.v[layer], meta.kv_slots, kv_len, scale=scale, rows=rows, zeros=zeros
        )
    return out[None]  # [1, B, Hq, D] in the query's dtype
