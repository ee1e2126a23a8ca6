"""Which KV slots the running trees hold, and the slot paths their branches read.

Three kinds of holding, each released exactly once when its tree is released:
- a prompt's slots, shared through the radix cache: the tree holds a lock on its cache node;
- without prefix sharing, the prompt's own slots;
- every generated token's slot (``alloc_for``), logged with its tree.
A *path* is the slots of everything before a segment (the prompt, then the ancestors' segments),
one row of a table shared by all branches forking from the same node: the siblings' cascade
group. Paths are added in bulk at forks, never per branch.
"""

from __future__ import annotations

import numpy as np
import torch

from treerpo.engine.kv_pool import KVPool
from treerpo.engine.radix_cache import RadixCache


class PathTable:
    """Rows of slots, padded to the longest path a batch can have."""

    def __init__(self, width: int):
        self.slots = np.zeros((16, max(1, width)), dtype=np.int64)
        self.length = np.zeros(16, dtype=np.int64)
        self.count = 0

    def add(self, rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Append paths (``rows`` [n, <= width], ``lengths`` [n]); returns their ids."""
        n = len(lengths)
        while self.count + n > len(self.length):
            self.slots = np.concatenate([self.slots, np.zeros_like(self.slots)])
            self.length = np.concatenate([self.length, np.zeros_like(self.length)])
        ids = np.arange(self.count, self.count + n)
        self.slots[ids, : rows.shape[1]] = rows
        self.length[ids] = lengths
        self.count += n
        return ids

    def extended(self, path_ids: np.ndarray, segments: np.ndarray, segment_len: np.ndarray) -> np.ndarray:
        """Add, for each path id, that path followed by the first ``segment_len`` slots of a row of ``segments``."""
        lengths = self.length[path_ids]
        rows = self.slots[path_ids].copy()
        cols = lengths[:, None] + np.arange(segments.shape[1])[None, :]
        inside = np.arange(segments.shape[1])[None, :] < segment_len[:, None]
        rows[np.nonzero(inside)[0], cols[inside]] = segments[inside]
        return self.add(rows, lengths + segment_len)


class BlockManager:
    def __init__(self, pool: KVPool, cache: RadixCache):
        self.pool = pool
        self.cache = cache
        self.paths = PathTable(0)
        self._cache_nodes: dict[int, object] = {}  # tree -> its locked radix node
        self._slot_parts: list[tuple[np.ndarray, np.ndarray]] = []  # (slots, their trees), released by tree

    def start(self, path_width: int) -> None:
        """A new batch whose paths are at most ``path_width`` slots."""
        self.paths = PathTable(path_width)
        self._cache_nodes.clear()
        self._slot_parts.clear()

    # ---- prompts --------------------------------------------------------------------------------------
    def hold_cached_prompt(self, trees: list[int], prompt: tuple) -> int:
        """The trees of one prompt lock its radix-cache node; returns the id of their (common) path."""
        slots, node = self.cache.match_prefix(list(prompt))
        for t in trees:
            self.cache.lock(node)
            self._cache_nodes[t] = node
        return int(self.paths.add(slots.numpy()[None], np.array([len(slots)]))[0])

    def hold_own_prompt(self, tree: int, slots: torch.Tensor) -> int:
        """A prompt prefilled for one tree alone: its slots are the tree's; returns its path id."""
        slots = slots.numpy()
        self.own(slots, np.full(len(slots), tree))
        return int(self.paths.add(slots[None], np.array([len(slots)]))[0])

    # ---- generated tokens -----------------------------------------------------------------------------
    def alloc_for(self, trees: np.ndarray) -> np.ndarray:
        """One fresh slot for each entry of ``trees``, owned by that tree from now on."""
        slots = self.pool.alloc(len(trees)).numpy()
        self.own(slots, trees)
        return slots

    def own(self, slots: np.ndarray, trees: np.ndarray) -> None:
        self._slot_parts.append((np.asarray(slots, dtype=np.int64), np.asarray(trees, dtype=np.int64)))

    # ---- release --------------------------------------------------------------------------------------
    def release(self, trees) -> None:
        """Give back everything ``trees`` hold: their slots and their cache locks."""
        trees = np.asarray(list(trees), dtype=np.int64)
        if not len(trees):
            return
        if self._slot_parts:
            slots, owners = (np.concatenate(c) for c in zip(*self._slot_parts, strict=True))
            mine = np.isin(owners, trees)
            self._slot_parts = [(slots[~mine], owners[~mine])] if not mine.all() else []
            if mine.any():
                self.pool.decref(slots[mine])
        for t in trees.tolist():
            node = self._cache_nodes.pop(t, None)
            if node is not None:
                self.cache.unlock(node)
