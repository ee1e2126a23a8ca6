"""Trees of reasoning segments: the shape to sample (TreeSpec) and a sampled tree (Tree).

A Tree stores its nodes in flat arrays. Node 0 is the root and holds the prompt; every
other node holds one generated segment and points at its parent. Nodes are numbered level
by level (children in order), so a parent's index is always smaller than its children's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class TreeSpec:
    """How to expand one prompt: ``branching[i]`` children per node at level i."""

    branching: tuple[int, ...]
    segment_tokens: int
    max_prompt_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    # entropy-triggered forks: a node above the last level ends its segment (and forks) at the first length
    # >= min_segment_tokens where the next token's entropy (nats, at the temperature) is >= fork_entropy
    fork_entropy: float | None = None
    min_segment_tokens: int = 1

    def __post_init__(self):
        object.__setattr__(self, "branching", tuple(int(b) for b in self.branching))
        if not self.branching or any(b < 1 for b in self.branching):
            raise ValueError(f"branching must be a non-empty list of integers >= 1, got {list(self.branching)}")
        if self.segment_tokens < 1:
            raise ValueError(f"segment_tokens must be >= 1, got {self.segment_tokens}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.fork_entropy is not None and not (np.isfinite(self.fork_entropy) and self.fork_entropy > 0):
            raise ValueError(
                f"fork_entropy must be a finite number of nats > 0 (None: fork at segment ends only), "
                f"got {self.fork_entropy}"
            )
        if not 1 <= self.min_segment_tokens <= self.segment_tokens:
            raise ValueError(
                f"min_segment_tokens must be in [1, segment_tokens={self.segment_tokens}], got "
                f"{self.min_segment_tokens}"
            )

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def max_leaves(self) -> int:
        return int(np.prod(self.branching))

    @property
    def max_new_tokens(self) -> int:
        """Longest root-to-leaf completion."""
        return self.depth * self.segment_tokens

    @property
    def max_generated_tokens(self) -> int:
        """Tokens generated for one full tree: L * (b1 + b1*b2 + ...)."""
        return self.segment_tokens * int(np.sum(np.cumprod(self.branching)))


@dataclass
class Tree:
    """One sampled tree. Segment tokens of node n are ``token_ids[offsets[n]:offsets[n+1]]``."""

    parent: np.ndarray  # int64 [n], root = -1
    depth: np.ndarray  # int64 [n], root = 0
    offsets: np.ndarray  # int64 [n + 1]
    token_ids: np.ndarray  # int64 [offsets[-1]]
    finished: np.ndarray  # bool [n]: the segment ended with EOS
    reward: np.ndarray = None  # float64 [n]: verifier score on leaves, nan elsewhere
    value: np.ndarray = None  # float64 [n]
    advantage: np.ndarray = None  # float64 [n]: 0 where the node's group was filtered out
    kept: np.ndarray = None  # bool [n]: the node's sibling group passed the tau filter
    token_logprobs: np.ndarray | None = None  # float [offsets[-1]]: sampler's log-prob of each token (nan: prompt)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. prompt text, gold answer

    def __post_init__(self):
        n = len(self.parent)
        for name in ("reward", "value"):
            if getattr(self, name) is None:
                setattr(self, name, np.full(n, np.nan))
        if self.advantage is None:
            self.advantage = np.zeros(n)
        if self.kept is None:
            self.kept = np.zeros(n, dtype=bool)

    @classmethod
    def from_segments(
        cls,
        prompt_ids: Sequence[int],
        parents: Sequence[int],
        segments: Sequence[Sequence[int]],
        finished: Sequence[bool],
        info: dict | None = None,
    ) -> "Tree":
        """Build from the prompt and the generated nodes (``parents`` index the full node list, root = 0)."""
        parent = np.array([-1, *parents], dtype=np.int64)
        if np.any(parent[1:] < 0) or np.any(parent[1:] >= np.arange(1, len(parent))):
            raise ValueError("every node's parent must be an earlier node (root = 0)")
        depth = np.zeros(len(parent), dtype=np.int64)
        for n in range(1, len(parent)):
            depth[n] = depth[parent[n]] + 1
        lengths = [len(prompt_ids)] + [len(s) for s in segments]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(
            [np.asarray(prompt_ids, dtype=np.int64)] + [np.asarray(s, dtype=np.int64) for s in segments]
        )
        done = np.array([False, *finished], dtype=bool)
        return cls(parent, depth, offsets, tokens, done, info=dict(info or {}))

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def prompt_ids(self) -> np.ndarray:
        return self.segment(0)

    def segment(self, node: int) -> np.ndarray:
        return self.token_ids[self.offsets[node] : self.offsets[node + 1]]

    def children(self, node: int) -> np.ndarray:
        return np.flatnonzero(self.parent == node)

    def is_leaf(self) -> np.ndarray:
        """Nodes without children (the root counts only when nothing was generated)."""
        has_child = np.zeros(self.num_nodes, dtype=bool)
        has_child[self.parent[1:]] = True
        return ~has_child

    def leaves(self) -> np.ndarray:
        return np.flatnonzero(self.is_leaf())

    def leaves_below(self) -> np.ndarray:
        """int64 [n]: the leaves in each node's subtree (a leaf counts itself); parents precede their children."""
        count = self.is_leaf().astype(np.int64)
        for node in range(self.num_nodes - 1, 0, -1):
            count[self.parent[node]] += count[node]
        return count

    def path(self, node: int) -> list[int]:
        """Nodes from the root to ``node``, inclusive."""
        nodes = []
        while node >= 0:
            nodes.append(int(node))
            node = self.parent[node]
        return nodes[::-1]

    def path_token_ids(self, node: int, include_prompt: bool = True) -> np.ndarray:
        nodes = self.path(node)[0 if include_prompt else 1 :]
        if not nodes:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([self.segment(n) for n in nodes])

    @property
    def generated_tokens(self) -> int:
        return self.num_tokens - len(self.prompt_ids)

    def completion_lengths(self) -> np.ndarray:
        """Tokens of each leaf's completion (its path without the prompt), in ``leaves()`` order."""
        seg_len = np.diff(self.offsets)
        length = seg_len.copy()
        length[0] = 0
        for node in range(1, self.num_nodes):  # parents precede children
            length[node] += length[self.parent[node]]
        return length[self.leaves()]
