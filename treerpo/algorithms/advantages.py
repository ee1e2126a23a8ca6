"""TreeRPO's step-level credit: node values from the leaves up, advantages within sibling groups.

A group is the children of one parent. GRPO is the depth-1 case: one group, the G answers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..tree import Tree

VALUE_MODES = ("children_mean", "leaf_mean")
NORMALIZATIONS = ("group_std", "mean_only", "batch_std")


def node_values(tree: Tree, mode: str = "children_mean") -> np.ndarray:
    """Leaves take their reward; an inner node the mean of its children's values ("children_mean")
    or the mean reward of all leaves below it ("leaf_mean")."""
    if mode not in VALUE_MODES:
        raise ValueError(f"unknown value mode {mode!r}; choose one of {VALUE_MODES}")
    leaf = tree.is_leaf()
    if np.isnan(tree.reward[leaf]).any():
        raise ValueError("every leaf needs a reward before values can be computed (score the tree first)")
    n = tree.num_nodes
    num_children = np.bincount(tree.parent[1:], minlength=n)
    child_sum = np.zeros(n)  # children_mean: sum of children's values
    leaf_sum = np.where(leaf, tree.reward, 0.0)  # leaf_mean: sum and count of leaf rewards below
    leaf_count = leaf.astype(float)
    values = np.where(leaf, tree.reward, np.nan)
    # children have larger indices than their parent: a reverse sweep finishes children first
    for node in range(n - 1, -1, -1):
        if not leaf[node]:
            values[node] = (child_sum[node] / num_children[node] if mode == "children_mean"
                            else leaf_sum[node] / leaf_count[node])
        p = tree.parent[node]
        if p >= 0:
            child_sum[p] += values[node]
            leaf_sum[p] += leaf_sum[node]
            leaf_count[p] += leaf_count[node]
    return values


def sibling_groups(tree: Tree) -> list[np.ndarray]:
    """Children of each inner node, in node order; the root's children come first."""
    order = np.argsort(tree.parent[1:], kind="stable") + 1
    parents = tree.parent[order]
    splits = np.flatnonzero(np.diff(parents)) + 1
    return np.split(order, splits) if len(order) else []


def compute_advantages(trees: Sequence[Tree], value_mode: str = "children_mean", normalization: str = "group_std",
                       tau: float = 0.1, eps: float = 1e-6) -> dict[str, float]:
    """Fill ``value``, ``advantage`` and ``kept`` of every tree; return batch statistics.

    A group is kept when it has at least two members and the (unbiased) std of its values is
    at least ``tau``; others get advantage 0 (no signal: e.g. all siblings equal). Advantage:
    value minus the group mean, divided by the group std + eps ("group_std"), by nothing
    ("mean_only"), or by the std of the centred values of all kept nodes in the batch ("batch_std").
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown advantage normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    kept_groups = total_groups = 0
    centred_all = []
    for tree in trees:
        tree.value = node_values(tree, value_mode)
        tree.advantage = np.zeros(tree.num_nodes)
        tree.kept = np.zeros(tree.num_nodes, dtype=bool)
        for group in sibling_groups(tree):
            total_groups += 1
            v = tree.value[group]
            std = v.std(ddof=1) if len(v) > 1 else 0.0
            if len(v) < 2 or std < tau or std == 0.0:
                continue
            kept_groups += 1
            centred = v - v.mean()
            tree.kept[group] = True
            tree.advantage[group] = centred / (std + eps) if normalization == "group_std" else centred
            centred_all.append(centred)
    if normalization == "batch_std" and centred_all:
        scale = np.concatenate(centred_all).std() + eps
        for tree in trees:
            tree.advantage = tree.advantage / scale
    return {"groups": total_groups, "kept_groups": kept_groups,
            "kept_group_fraction": kept_groups / total_groups if total_groups else 0.0}
