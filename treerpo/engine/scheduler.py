"""Admission and release of trees (continuous batching).

A tree is admitted only when its worst-case slot count (prompt + every token it may generate)
fits beside what the running trees may still take, evicting unlocked cache entries first,
so a batch larger than the pool waits instead of failing half-way. A tree whose last branch
ended is released at once and the waiting trees move up.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from treerpo.engine.block_manager import BlockManager
from treerpo.engine.kv_pool import RequestTooLarge


def worst_case_tokens(
    prompt_lengths,
    max_generated_tokens: int,
    capacity_tokens: int,
    knob: str = "TreeSampler's pool_tokens / memory_bytes",
) -> np.ndarray:
    """The KV slots each tree may take (its prompt and every token it may generate); refuses, before any work,
    a tree that could never fit in a pool of ``capacity_tokens``."""
    worst = np.asarray(prompt_lengths, dtype=np.int64) + max_generated_tokens
    if len(worst) and worst.max() > capacity_tokens:
        i = int(worst.argmax())
        raise RequestTooLarge(
            f"one tree may need {worst[i]} KV slots (tree {i}: prompt {worst[i] - max_generated_tokens} + up to "
            f"{max_generated_tokens} generated) but the KV pool holds {capacity_tokens} tokens, set by {knob}; give "
            "the sampler a larger pool or make the tree smaller"
        )
    return worst


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
                        "give the sampler a larger pool (kv_pool_tokens / memory_bytes)"
                    )
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
