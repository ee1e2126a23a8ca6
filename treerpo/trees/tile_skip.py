"""Which key tiles each query tile of a tree-masked attention must visit: the kernels' skip list.

Query tile i holds the rows ``[i * block_q, (i + 1) * block_q)`` of a packed batch and key tile j the
rows ``[j * block_k, (j + 1) * block_k)``. The pair is needed iff some query q and key k in it satisfy
``tin[k] <= tin[q] < tout[k]`` (k is an ancestor-or-self of q). The list is a CSR: the key tiles of
query tile i are ``key_tiles[offsets[i]:offsets[i + 1]]``, ascending. ``tile_skip`` runs in C++
(``treerpo._C``) when it is built; ``tile_skip_vectorized`` is the torch version (any size),
``tile_skip_dense`` the brute force from the dense mask that both are tested against.
"""

from __future__ import annotations

import numpy as np
import torch

from treerpo.trees.native import native_module


def tile_skip(tin, tout, block_q: int = 64, block_k: int = 64, backend: str = "auto"):
    """(offsets int64 [Q + 1], key_tiles int32) as torch tensors; ``tin`` must be strictly increasing."""
    native = native_module(backend)
    if native is None:
        return tile_skip_vectorized(tin, tout, block_q, block_k)
    offsets, key_tiles = native.tile_skip(_as_numpy(tin), _as_numpy(tout), block_q, block_k)
    return torch.from_numpy(offsets), torch.from_numpy(key_tiles)


def tile_skip_dense(tin, tout, block_q: int = 64, block_k: int = 64):
    """Brute force: any() of the dense [N, N] visibility mask over each tile. Small N only."""
    tin, tout = torch.as_tensor(tin).long(), torch.as_tensor(tout).long()
    _check_blocks(block_q, block_k)
    n = len(tin)
    num_q, num_k = -(-n // block_q), -(-n // block_k)
    mask = torch.zeros(num_q * block_q, num_k * block_k, dtype=torch.bool)
    mask[:n, :n] = (tin[None, :] <= tin[:, None]) & (tin[:, None] < tout[None, :])
    needed = mask.view(num_q, block_q, num_k, block_k).any(dim=3).any(dim=1)
    return _csr(*torch.nonzero(needed, as_tuple=True), num_q)


def tile_skip_vectorized(tin, tout, block_q: int = 64, block_k: int = 64):
    """O(N + pairs): key k is visible to the rows [k, end_k); per key tile, the union of those intervals
    (keys ascending, so their first query tiles are too) is split into runs by a running maximum."""
    tin, tout = torch.as_tensor(tin).long(), torch.as_tensor(tout).long()
    _check_blocks(block_q, block_k)
    n = len(tin)
    if n > 1 and not bool((tin[1:] > tin[:-1]).all()):
        raise ValueError("tin must be strictly increasing")
    num_q = -(-n // block_q)
    if n == 0:
        return torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.int32)
    contiguous = bool((tin == tin[0] + torch.arange(n)).all())
    end = (tout - tin[0]).clamp(0, n) if contiguous else torch.searchsorted(tin, tout)
    keys = torch.nonzero(end > torch.arange(n)).squeeze(1)
    key_tile, first, last = keys // block_k, keys // block_q, (end[keys] - 1) // block_q
    # a running maximum of `last` within each key tile: offset each tile above every earlier one
    reach = torch.cummax(key_tile * (num_q + 1) + last, dim=0).values - key_tile * (num_q + 1)
    new_run = torch.ones_like(keys, dtype=torch.bool)
    new_run[1:] = (key_tile[1:] != key_tile[:-1]) | (first[1:] > reach[:-1])
    run_end = torch.ones_like(new_run)
    run_end[:-1] = new_run[1:]
    run_first, run_last, run_tile = first[new_run], reach[run_end], key_tile[new_run]
    lengths = run_last - run_first + 1
    run_index = torch.repeat_interleave(torch.arange(len(run_first)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    query_tile = run_first[run_index] + torch.arange(len(run_index)) - starts[run_index]
    return _csr(query_tile, run_tile[run_index], num_q)


def _csr(query_tile: torch.Tensor, key_tile: torch.Tensor, num_q: int):
    """Pairs listed by ascending key tile -> CSR by query tile (a stable sort keeps key tiles ascending)."""
    order = torch.sort(query_tile, stable=True).indices
    counts = torch.bincount(query_tile, minlength=num_q)
    offsets = torch.zeros(num_q + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets, key_tile[order].to(torch.int32)


def _check_blocks(block_q: int, block_k: int):
    if block_q < 1 or block_k < 1:
        raise ValueError("block_q and block_k must be >= 1")


def _as_numpy(x) -> np.ndarray:
    """Zero-copy for CPU tensors and arrays of int32 or int64 (what _C takes)."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x if x.dtype in (np.int32, np.int64) else x.astype(np.int64)
