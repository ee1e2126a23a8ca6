"""Pack a batch of trees into one token buffer, depth-first, for a single tree-masked forward.

Token q may attend to token k iff k is an ancestor-or-self of q in the token tree. With
depth-first order that is the interval test ``tin[k] <= tin[q] < tout[k]``: ``tin`` is the
token's buffer index and ``tout`` the end of its subtree. Positions are depths along the
path, and ``prev_index[t]`` is the row whose logits predict token t: the previous token of
the same segment, or the parent's last token for a segment's first token.

``pack_trees`` runs in C++ (``treerpo._C``, the whole batch at once) when it is built;
``backend="python"`` runs the implementation below, the reference the C++ is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from treerpo.tree import Tree
from treerpo.trees.native import FlatTrees, native_module


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # long [N]
    position_ids: torch.Tensor  # long [N]
    tin: torch.Tensor  # int32 [N]
    tout: torch.Tensor  # int32 [N]
    prev_index: torch.Tensor  # long [N]; -1 for each tree's first token
    loss_mask: torch.Tensor  # bool [N]: generated tokens of kept groups
    advantages: torch.Tensor  # float32 [N]
    tree_index: torch.Tensor  # long [N]
    node_index: torch.Tensor  # long [N]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def nodes_to_pack(tree: Tree, prune: bool) -> np.ndarray:
    """Nodes that must be in the forward: all, or (``prune``) only those with a kept node at or below them."""
    if not prune:
        return np.ones(tree.num_nodes, dtype=bool)
    needed = tree.kept.copy()
    needed[0] = True
    for node in range(tree.num_nodes - 1, 0, -1):
        if needed[node]:
            needed[tree.parent[node]] = True
    return needed


def dfs_order(tree: Tree, include: np.ndarray) -> list[int]:
    """Pre-order over included nodes, children in creation order."""
    children: list[list[int]] = [[] for _ in range(tree.num_nodes)]
    for node in range(1, tree.num_nodes):
        if include[node]:
            children[tree.parent[node]].append(node)
    order, stack = [], [0]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(children[node]))
    return order


def pack_trees(trees: Sequence[Tree], prune_unkept: bool = False, backend: str = "auto") -> PackedBatch:
    """Lay out every tree depth-first in one buffer. ``prune_unkept`` leaves out subtrees with no loss token."""
    native = native_module(backend)
    if native is None:
        return _pack_trees_python(trees, prune_unkept)
    flat = FlatTrees.from_trees(trees, with_tokens=True)
    cols = native.pack(
        flat.node_offsets, flat.parent, flat.token_offsets, flat.token_ids, flat.kept, flat.advantage, prune_unkept
    )
    return PackedBatch(**{name: torch.from_numpy(col) for name, col in cols.items()})


def _pack_trees_python(trees: Sequence[Tree], prune_unkept: bool) -> PackedBatch:
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("ids", "pos", "tin", "tout", "prev", "mask", "adv", "tree", "node")
    }
    base = 0
    for t_idx, tree in enumerate(trees):
        include = nodes_to_pack(tree, prune_unkept)
        order = dfs_order(tree, include)
        seg_len = np.diff(tree.offsets)
        start = np.zeros(tree.num_nodes, dtype=np.int64)  # buffer start of each node's segment
        pos0 = np.zeros(tree.num_nodes, dtype=np.int64)  # position of each node's first token
        last_row = np.full(tree.num_nodes, -1, dtype=np.int64)  # last row of the path down to the node
        cursor = base
        for node in order:
            start[node] = cursor
            cursor += seg_len[node]
            if node:
                pos0[node] = pos0[tree.parent[node]] + seg_len[tree.parent[node]]
            if seg_len[node]:
                last_row[node] = start[node] + seg_len[node] - 1
            elif node:  # an empty segment predicts nothing: the nearest non-empty ancestor predicts its children
                last_row[node] = last_row[tree.parent[node]]
        subtree_end = {node: start[node] + seg_len[node] for node in order}
        for node in reversed(order[1:]):  # children after parents in pre-order: reverse finishes them first
            p = tree.parent[node]
            subtree_end[p] = max(subtree_end[p], subtree_end[node])
        for node in order:
            n = int(seg_len[node])
            idx = start[node] + np.arange(n)
            cols["ids"].append(tree.segment(node))
            cols["pos"].append(pos0[node] + np.arange(n))
            cols["tin"].append(idx)
            cols["tout"].append(np.full(n, subtree_end[node]))
            prev = idx - 1
            if n:
                prev[0] = last_row[tree.parent[node]] if node else -1
            cols["prev"].append(prev)
            cols["mask"].append(np.full(n, bool(node and tree.kept[node])))
            cols["adv"].append(np.full(n, tree.advantage[node] if node else 0.0))
            cols["tree"].append(np.full(n, t_idx))
            cols["node"].append(np.full(n, node))
        base = cursor
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    return PackedBatch(
        input_ids=torch.as_tensor(cat["ids"], dtype=torch.long),
        position_ids=torch.as_tensor(cat["pos"], dtype=torch.long),
        tin=torch.as_tensor(cat["tin"], dtype=torch.int32),
        tout=torch.as_tensor(cat["tout"], dtype=torch.int32),
        prev_index=torch.as_tensor(cat["prev"], dtype=torch.long),
        loss_mask=torch.as_tensor(cat["mask"], dtype=torch.bool),
        advantages=torch.as_tensor(cat["adv"], dtype=torch.float32),
        tree_index=torch.as_tensor(cat["tree"], dtype=torch.long),
        node_index=torch.as_tensor(cat["node"], dtype=torch.long),
    )
