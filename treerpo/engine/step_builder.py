"""The inputs of one forward over the KV pool (``StepInputs``), built from whole arrays.

A decode step feeds every live branch its last sampled token: the token ids, positions and
paged-attention metadata of all branches come from a few vectorised operations on the
branch table and the path table, with no Python loop over branches. With ``cascade`` the
branches are grouped by the path they read (the siblings of a node, or the trees of one
prompt), each group's path listed once and each branch carrying only its own segment's
slots. Host arrays reach the device through ``HostStaging`` in one copy a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from treerpo.attention.paged import CascadeGroups, PagedAttentionMetadata, cascade_arrays
from treerpo.engine.block_manager import PathTable
from treerpo.engine.sequence import Branches


@dataclass
class StepInputs:
    """What ``ModelRunner.run`` needs: the new tokens of many sequences packed in one row."""

    input_ids: torch.Tensor  # long [1, N]
    position_ids: torch.Tensor  # long [1, N]
    meta: PagedAttentionMetadata
    last_rows: torch.Tensor  # long [B]: the packed row whose logits each sequence returns
    num_tokens: int


class HostStaging:
    """Moves a step's int64 host arrays to the device. On CUDA they are packed into one of two persistent pinned
    buffers (alternating, each reused only after its previous copy completed) and copied asynchronously in one
    transfer; on the CPU they are wrapped without a copy."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._copied: list = [None, None]
        self._turn = 0

    def __call__(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.device.type != "cuda":
            return {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for k, a in arrays.items()}
        sizes = [a.size for a in arrays.values()]
        buffer = self._buffer(sum(sizes))
        host = buffer.numpy()
        start = 0
        for a, size in zip(arrays.values(), sizes, strict=True):
            host[start : start + size] = a.reshape(-1)
            start += size
        on_device = buffer[:start].to(self.device, non_blocking=True)
        self._copied[self._turn] = torch.cuda.Event()
        self._copied[self._turn].record()
        self._turn ^= 1
        out, start = {}, 0
        for (name, a), size in zip(arrays.items(), sizes, strict=True):
            out[name] = on_device[start : start + size].view(a.shape)
            start += size
        return out

    def _buffer(self, size: int) -> torch.Tensor:
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()  # its last copy left long ago: the step's tokens came back
        buffer = self._pinned[self._turn]
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(
                max(size, 1 << 16, 2 * (0 if buffer is None else buffer.numel())), dtype=torch.int64, pin_memory=True
            )
            self._pinned[self._turn] = buffer
        return buffer


def decode_bucket(rows: int) -> int:
    """The padded row count of a decode step of ``rows`` branches: a power of two from 2 up to 256, then a multiple of
    256 (so a run's steps take a few shapes, each a CUDA graph recorded once; never one row, which compiled graphs
    would specialise for)."""
    return max(2, 1 << max(0, rows - 1).bit_length()) if rows <= 256 else -(-rows // 256) * 256


def decode_inputs(
    branches: Branches, paths: PathTable, pool, staging: HostStaging, cascade: bool, pad_to: int | None = None
) -> StepInputs:
    """Every branch's last sampled token, its slot already in ``own_slots[b, n - 1]``. With ``pad_to``, rows past the
    branches up to it are padding: token 0 at position 0, writing and reading only the pool's scratch slot (with
    ``cascade``, a group of their own whose prefix is that slot), their hidden states never returned."""
    b = len(branches)
    pad = 0 if pad_to is None else pad_to - b
    if pad < 0:
        raise ValueError(f"pad_to={pad_to} is fewer rows than the step's {b} branches")
    rows = np.arange(b + pad)
    own_len = np.concatenate([branches.n, np.ones(pad, dtype=np.int64)])  # own slots to read, the new token's included
    path_len = np.concatenate([paths.length[branches.path], np.zeros(pad, dtype=np.int64)])
    scratch = np.full(pad, pool.scratch_slot, dtype=np.int64)
    width = int(branches.n.max(initial=1))
    own = np.concatenate([_first(branches.own_slots[:, :width], branches.n), _column(scratch, width)])
    arrays = {
        "input_ids": np.concatenate([branches.last_tokens(), np.zeros(pad, dtype=np.int64)])[None],
        "position_ids": (path_len + own_len - 1)[None],
        "write_slots": np.concatenate([branches.own_slots[np.arange(b), branches.n - 1], scratch]),
        "query_rows": rows[:, None],
        "last_rows": np.arange(b),
    }
    if cascade:
        group_paths, group_of_seq = np.unique(branches.path, return_inverse=True)
        prefixes, prefix_len = paths.slots[group_paths], paths.length[group_paths]
        if pad:  # one more group: the padding rows, their prefix the scratch slot
            prefixes = np.concatenate([prefixes, _column(scratch[:1], prefixes.shape[1])])
            prefix_len = np.concatenate([prefix_len, [1]])
            group_of_seq = np.concatenate([group_of_seq, np.full(pad, len(group_paths))])
        arrays.update(kv_slots=own, query_key_pos=(own_len - 1)[:, None])
        arrays.update(cascade_arrays(prefixes, prefix_len, group_of_seq, own, own_len, pool.num_kv_heads))
    else:
        kv_len = path_len + own_len
        path_rows = np.concatenate([paths.slots[branches.path], np.zeros((pad, paths.slots.shape[1]), dtype=np.int64)])
        arrays.update(kv_slots=_joined(path_rows, path_len, own, own_len), query_key_pos=(kv_len - 1)[:, None])
    t = staging(arrays)
    groups = CascadeGroups.from_staged(t) if cascade else None
    meta = PagedAttentionMetadata(
        pool,
        t["write_slots"],
        t["query_rows"],
        t["kv_slots"],
        t["query_key_pos"],
        groups=groups,
        max_positions=int((path_len + own_len).max()),
    )
    return StepInputs(t["input_ids"], t["position_ids"], meta, t["last_rows"], b + pad)


def repeated_path_keys(branches: Branches, paths: PathTable) -> int:
    """Path keys a decode step without the cascade reads again: every path once a branch instead of once."""
    path_len = paths.length
    return int(path_len[branches.path].sum() - path_len[np.unique(branches.path)].sum())


def _column(slots: np.ndarray, width: int) -> np.ndarray:
    """Rows [len(slots), width]: each slot, then slot 0 (padding)."""
    table = np.zeros((len(slots), max(width, 1)), dtype=np.int64)
    table[:, 0] = slots
    return table


def _first(table: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The first lengths[r] slots of every row, the rest set to slot 0 (padding)."""
    return np.where(np.arange(table.shape[1])[None, :] < lengths[:, None], table, 0)


def _joined(path_rows: np.ndarray, path_len: np.ndarray, own: np.ndarray, own_len: np.ndarray) -> np.ndarray:
    """Row b: ``path_rows[b, :path_len[b]]`` then ``own[b, :own_len[b]]``, padded with slot 0 to the longest."""
    kv_len = path_len + own_len
    cols = np.arange(int(kv_len.max()))[None, :]
    joined = np.zeros((len(kv_len), cols.shape[1]), dtype=np.int64)
    in_path = cols < path_len[:, None]
    width = min(cols.shape[1], path_rows.shape[1])
    joined[:, :width][in_path[:, :width]] = path_rows[:, :width][in_path[:, :width]]
    joined[~in_path & (cols < kv_len[:, None])] = own[np.arange(own.shape[1])[None, :] < own_len[:, None]]
    return joined


def sequence_inputs(
    pool, sequences: list[tuple], new_tokens: list, device, prefixes=None, group_of_seq=None, staging=None
) -> StepInputs:
    """Inputs of a forward over arbitrary sequences (prefill, or decode steps given one by one): per sequence the
    slots of its cached path (after its group's prefix, with ``prefixes``), its new slots and new tokens. With
    ``staging`` (the engine's ``HostStaging``) every array reaches the device in one copy."""
    new_len = np.fromiter(map(len, new_tokens), dtype=np.int64, count=len(new_tokens))
    if not new_len.all():
        raise ValueError("every sequence in a forward needs at least one new token")
    arrays = PagedAttentionMetadata.host_arrays(sequences, pool.num_kv_heads, prefixes, group_of_seq)
    cached_len = np.fromiter((len(old) for old, _ in sequences), dtype=np.int64, count=len(sequences))
    if prefixes is not None:
        cached_len += np.fromiter(map(len, prefixes), dtype=np.int64, count=len(prefixes))[group_of_seq]
    ends = np.cumsum(new_len)
    arrays["input_ids"] = np.concatenate([np.asarray(t, dtype=np.int64) for t in new_tokens])[None]
    arrays["position_ids"] = (np.arange(ends[-1]) + np.repeat(cached_len - (ends - new_len), new_len))[None]
    arrays["last_rows"] = ends - 1
    if staging is None:
        t = {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device) for k, a in arrays.items()}
    else:
        t = staging(arrays)
    meta = PagedAttentionMetadata.from_staged(pool, t, prefixes is not None)
    meta.max_positions = int((cached_len + new_len).max())
    return StepInputs(t["input_ids"], t["position_ids"], meta, t["last_rows"], int(ends[-1]))
