"""Branch and node state of a batch of trees, as flat arrays.

``Branches`` holds every live branch (a node being generated) of every running tree, one row
each; a decode step reads and updates whole columns, and a fork turns the rows that finished
their segment into their children in one vectorised operation. ``NodeRecords`` collects the
finished nodes and builds the trees at the end, numbered breadth-first (the reference
sampler's layout).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from treerpo.engine.branch_seeds import child_seeds
from treerpo.tree import Tree, TreeSpec

ROOT = -1  # parent record of a depth-1 node: the tree's prompt


@dataclass
class Branches:
    """Live branches, row b of every column. ``tokens[b, :n[b]]`` is the segment so far; its last token is
    sampled but not yet fed to the model; ``own_slots[b, :n[b] - 1]`` hold the K/V of those fed."""

    tree: np.ndarray  # int64: index of the tree in the batch
    parent: np.ndarray  # int64: record of the parent node (ROOT: the prompt)
    child: np.ndarray  # int64: index among its siblings
    depth: np.ndarray  # int64: 1-based level of the node being generated
    code: np.ndarray  # int64: child indices from the root in mixed radix (the breadth-first order within a level)
    path: np.ndarray  # int64: id (BlockManager paths) of the slots of everything before this segment
    seed: np.ndarray  # uint64: the branch's seed (branch_seeds)
    n: np.ndarray  # int64: tokens in the segment so far
    tokens: np.ndarray  # int64 [B, segment_tokens]
    logprobs: np.ndarray  # float64 [B, segment_tokens]
    own_slots: np.ndarray  # int64 [B, segment_tokens]

    @classmethod
    def empty(cls, segment_tokens: int) -> "Branches":
        cols = {f.name: np.zeros(0, dtype=np.uint64 if f.name == "seed" else np.int64) for f in fields(cls)}
        for name, dtype in (("tokens", np.int64), ("logprobs", np.float64), ("own_slots", np.int64)):
            cols[name] = np.zeros((0, segment_tokens), dtype=dtype)
        return cls(**cols)

    def __len__(self) -> int:
        return len(self.tree)

    def take(self, rows) -> "Branches":
        return Branches(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def concat(parts: list["Branches"]) -> "Branches":
        return Branches(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Branches)})

    def last_tokens(self) -> np.ndarray:
        return self.tokens[np.arange(len(self)), self.n - 1]

    def append(self, tokens: np.ndarray, logprobs: np.ndarray) -> None:
        """One more sampled token for every row."""
        rows = np.arange(len(self))
        self.tokens[rows, self.n] = tokens
        self.logprobs[rows, self.n] = logprobs
        self.n += 1


def children_of(
    parents: Branches, records: np.ndarray, paths: np.ndarray, spec: TreeSpec, tokens: np.ndarray, logprobs: np.ndarray
) -> Branches:
    """The children of nodes that just completed (``parents``, stored as ``records``, their path ids the new
    ``paths``): child j of parent p draws ``tokens[p, j]``. Every parent is on one level of the same spec."""
    if len(parents) == 0:
        return Branches.empty(spec.segment_tokens)
    k = spec.branching[int(parents.depth[0])]  # children of a node at level d are on level d + 1
    rep = lambda a: np.repeat(a, k)  # noqa: E731
    child = np.tile(np.arange(k, dtype=np.int64), len(parents))
    first = np.zeros((len(parents) * k, spec.segment_tokens), dtype=np.int64)
    first_lp = np.zeros(first.shape, dtype=np.float64)
    first[:, 0], first_lp[:, 0] = tokens[:, :k].reshape(-1), logprobs[:, :k].reshape(-1)
    return Branches(
        tree=rep(parents.tree),
        parent=rep(records),
        child=child,
        depth=rep(parents.depth) + 1,
        code=rep(parents.code) * k + child,
        path=rep(paths),
        seed=child_seeds(rep(parents.seed), child),
        n=np.ones(len(child), dtype=np.int64),
        tokens=first,
        logprobs=first_lp,
        own_slots=np.zeros(first.shape, dtype=np.int64),
    )


def roots(trees: np.ndarray, paths: np.ndarray, seeds: np.ndarray) -> Branches:
    """The prompt of each tree as a parent for ``children_of`` (depth 0)."""
    zeros = np.zeros(len(trees), dtype=np.int64)
    return Branches(
        tree=np.asarray(trees, dtype=np.int64),
        parent=zeros + ROOT,
        child=zeros,
        depth=zeros,
        code=zeros,
        path=np.asarray(paths, dtype=np.int64),
        seed=np.asarray(seeds, dtype=np.uint64),
        n=zeros,
        tokens=np.zeros((len(trees), 0), dtype=np.int64),
        logprobs=np.zeros((len(trees), 0)),
        own_slots=np.zeros((len(trees), 0), dtype=np.int64),
    )


class NodeRecords:
    """Completed nodes of the batch, in completion order (record ids 0, 1, ...)."""

    def __init__(self):
        self._parts: list[tuple] = []
        self.count = 0

    def add(self, done: Branches, finished: np.ndarray) -> np.ndarray:
        """Store completed branches; returns their record ids."""
        ids = np.arange(self.count, self.count + len(done))
        if len(done):
            self._parts.append(
                (
                    done.tree,
                    done.parent,
                    done.child,
                    done.depth,
                    done.code,
                    done.n,
                    np.asarray(finished, dtype=bool),
                    done.tokens,
                    done.logprobs,
                )
            )
            self.count += len(done)
        return ids

    def build_trees(self, prompts: list, infos: list) -> list[Tree]:
        """Every tree with its nodes numbered breadth-first, children in order (sorted by level, then code)."""
        cols = [np.concatenate(c) for c in zip(*self._parts, strict=True)] if self._parts else None
        if cols is None:
            return [_tree(p, info, *_no_nodes()) for p, info in zip(prompts, infos, strict=True)]
        tree, parent, _child, depth, code, n, finished, tokens, logprobs = cols
        order = np.lexsort((code, depth, tree))
        counts = np.bincount(tree, minlength=len(prompts))
        starts = np.cumsum(counts) - counts
        local = np.empty(len(order), dtype=np.int64)  # node id of each record in its tree (root = 0)
        local[order] = np.arange(len(order)) - np.repeat(starts, counts) + 1
        parent_local = np.where(parent[order] == ROOT, 0, local[np.maximum(parent[order], 0)])
        out = []
        for t, (prompt, info) in enumerate(zip(prompts, infos, strict=True)):
            sel = order[starts[t] : starts[t] + counts[t]]
            nodes = (
                parent_local[starts[t] : starts[t] + counts[t]],
                depth[sel],
                n[sel],
                finished[sel],
                _rows(tokens[sel], n[sel]),
                _rows(logprobs[sel], n[sel]),
            )
            out.append(_tree(prompt, info, *nodes))
        return out


def _rows(table: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The first lengths[r] entries of every row, concatenated."""
    return table[np.arange(table.shape[1])[None, :] < lengths[:, None]]


def _no_nodes():
    e = np.zeros(0, dtype=np.int64)
    return e, e, e, np.zeros(0, dtype=bool), e, np.zeros(0)


def _tree(prompt, info, parent, depth, n, finished, tokens, logprobs) -> Tree:
    prompt = np.asarray(prompt, dtype=np.int64)
    lengths = np.concatenate([[len(prompt)], n])
    tree = Tree(
        parent=np.concatenate([[-1], parent]).astype(np.int64),
        depth=np.concatenate([[0], depth]).astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        token_ids=np.concatenate([prompt, tokens]).astype(np.int64),
        finished=np.concatenate([[False], finished]).astype(bool),
        info=dict(info),
    )
    tree.token_logprobs = np.concatenate([np.full(len(prompt), np.nan), logprobs])
    return tree
