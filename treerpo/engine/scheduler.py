"""Admission and release of trees (continuous batching).

A tree is admitted only when its worst-case slot count (prompt + every token it may generate)
fits beside what the running trees may still take, evicting unlocked cache entries first,
so a batch larger than the pool waits instead of failing half-way. A tree whose last branch
ended is released at once and the waiting trees move up.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from .block_manager import BlockManager


class Scheduler:
    def __init__(self, blocks: BlockManager, worst_tokens: np.ndarray):
        self.blocks = blocks
        self.worst = np.asarray(worst_tokens, dtype=np.int64)
        self.used = np.zeros(len(self.worst), dtype=np.int64)  # slots each tree took so far (prompt included)
        self.live = np.zeros(len(self.worst), dtype=np.int64)  # live branches of each tree
        self.waiting = deque(range(len(self.worst)))
        self.running: set[int] = set()

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def admit(self) -> list[int]:
        """Trees that fit now, in order."""
        pool, cache, admitted = self.blocks.pool, self.blocks.cache, []
        outstanding = int(sum(self.worst[t] - self.used[t] for t in self.running))
        while self.waiting:
            need = int(self.worst[self.waiting[0]])
            short = need + outstanding - pool.free_tokens
            if short > 0:
                short -= cache.evict_pages(short)
            if short > 0:
                if not self.running:
                    raise RuntimeError(
                        f"tree {self.waiting[0]} needs {need} KV slots but only {pool.free_tokens} are free after "
                        f"evicting the cache ({cache.total_cached_tokens} cached tokens are locked); "
                        "give the sampler a larger pool (kv_pool_tokens / memory_bytes)")
                break
            t = self.waiting.popleft()
            self.running.add(t)
            admitted.append(t)
            outstanding += need
        return admitted

    def count_used(self, trees: np.ndarray, tokens_each=1) -> None:
        np.add.at(self.used, trees, tokens_each)

    def set_live(self, trees: np.ndarray) -> None:
        """``trees``: the tree of every live branch after a step."""
        self.live[:] = np.bincount(trees, minlength=len(self.live))

    def release_finished(self) -> None:
        finished = [t for t in self.running if self.live[t] == 0]
        self.blocks.release(finished)
        self.running.difference_update(finished)

    def abandon(self) -> None:
        """After an exception: every running tree gives back what it holds."""
        self.blocks.release(self.running)
        self.running.clear()
