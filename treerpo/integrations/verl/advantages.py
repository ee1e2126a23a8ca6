"""TreeRPO's advantages for a batch of verl samples, each sample one leaf of a tree (no verl import).

The rollout puts into each sample's ``extra_fields`` (``leaf_fields``) the tree's key, the leaf's node and the tree's
shape (every node's parent and segment length): enough to rebuild the tree's skeleton on the trainer side, where the
samples' rewards are known. Then ``compute_advantages`` (node values from the leaves, sibling-group advantages, the
tau filter) and ``flatten_trees`` give each sample the advantage of every response token's node, weighted by
``1 / leaves below the node`` so that a segment shared by several leaves counts once in total, and the number of
distinct loss tokens, treerpo's normaliser. ``verl_token_mean_scale`` turns those into what verl's ``token-mean``
loss (which divides by every sample's tokens, shared ones counted again) needs to equal treerpo's packed loss: PPO's
clipped objective is homogeneous in the advantage, so scaling the advantages scales the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from treerpo.algorithms.advantages import compute_advantages
from treerpo.tree import Tree
from treerpo.trees.flatten import flatten_trees

FIELD = "treerpo_tree"


def leaf_fields(tree: Tree, leaf: int, key: str) -> dict:
    """What a leaf's sample carries: the tree's key, the leaf, and the tree's shape (parents, segment lengths,
    finished flags; root first, its segment the prompt)."""
    return {
        "key": key,
        "leaf": int(leaf),
        "parent": tree.parent.tolist(),
        "lengths": np.diff(tree.offsets).tolist(),
        "finished": tree.finished.tolist(),
    }


def skeleton(fields: dict) -> Tree:
    """A tree of the same shape (token ids zero: advantages need none)."""
    lengths = fields["lengths"]
    parents = fields["parent"][1:]
    segments = [np.zeros(n, dtype=np.int64) for n in lengths[1:]]
    return Tree.from_segments(np.zeros(lengths[0], dtype=np.int64), parents, segments, fields["finished"][1:])


@dataclass
class SampleAdvantages:
    advantages: list[np.ndarray | None]  # per sample: its response tokens' advantages (None: not a tree leaf)
    loss_tokens: int  # distinct loss tokens of the batch's trees: treerpo's token-mean normaliser
    stats: dict[str, float]
    trees: list[Tree]


def sample_advantages(
    samples: Sequence[dict | None],
    rewards: Sequence[float],
    *,
    value_mode: str = "children_mean",
    normalization: str = "group_std",
    tau: float = 0.1,
) -> SampleAdvantages:
    """``samples[i]``: sample i's ``extra_fields[FIELD]`` (None for a sample that is no leaf, e.g. verl's padding
    rows or a tree's missing leaves). Every leaf of a tree must be in the batch exactly once."""
    by_key: dict[str, list[int]] = {}
    for i, fields in enumerate(samples):
        if fields is not None:
            by_key.setdefault(fields["key"], []).append(i)
    trees, rows_of_tree = [], []
    for key, rows in by_key.items():
        tree = skeleton(samples[rows[0]])
        leaves = sorted(int(samples[i]["leaf"]) for i in rows)
        if leaves != sorted(int(x) for x in tree.leaves() if x != 0):
            raise ValueError(
                f"tree {key!r}: the batch holds leaves {leaves}, the tree has {tree.leaves().tolist()}; every leaf "
                "of a tree must be in the same batch (one mini-batch a step: ppo_mini_batch_size = train_batch_size)"
            )
        for i in rows:
            tree.reward[int(samples[i]["leaf"])] = float(rewards[i])
        trees.append(tree)
        rows_of_tree.append({int(samples[i]["leaf"]): i for i in rows})
    stats = compute_advantages(trees, value_mode, normalization, tau) if trees else {}
    flat = flatten_trees(trees)
    out: list[np.ndarray | None] = [None] * len(samples)
    for (t, leaf), adv in zip(flat.rows, flat.token_advantages, strict=True):
        out[rows_of_tree[t][leaf]] = adv
    return SampleAdvantages(out, flat.loss_tokens, stats, trees)


def verl_token_mean_scale(response_tokens: int, loss_tokens: int) -> float:
    """The factor on the advantages under which verl's ``token-mean`` (every sample's response tokens, shared ones
    again) equals treerpo's packed loss (each distinct loss token once)."""
    return response_tokens / loss_tokens if loss_tokens else 0.0
