"""TreeRPO's step-level credit: node values from the leaves up, advantages within sibling groups.

A group is the children of one parent. GRPO is the depth-1 case: one group, the G answers.
These functions run in C++ (``treerpo._C``, a whole batch at once) when it is built; ``backend="python"``
runs the implementations below, the reference the C++ is tested against.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from treerpo.tree import Tree
from treerpo.trees.native import FlatTrees, native_module

VALUE_MODES = ("children_mean", "leaf_mean")
NORMALIZATIONS = ("group_std", "mean_only", "batch_std")


def node_values(tree: Tree, mode: str = "children_mean", backend: str = "auto") -> np.ndarray:
    """Leaves take their reward; an inner node the mean of its children's values ("children_mean")
    or the mean reward of all leaves below it ("leaf_mean")."""
    if mode not in VALUE_MODES:
        raise ValueError(f"unknown value mode {mode!r}; choose one of {VALUE_MODES}")
    native = native_module(backend)
    if native is not None:
        flat = FlatTrees.from_trees([tree])
        return native.node_values(flat.node_offsets, flat.parent, flat.reward, mode)
    return _node_values_python(tree, mode)


def _node_values_python(tree: Tree, mode: str) -> np.ndarray:
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
            values[node] = (
                child_sum[node] / num_children[node] if mode == "children_mean" else leaf_sum[node] / leaf_count[node]
            )
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


def compute_advantages(
    trees: Sequence[Tree],
    value_mode: str = "children_mean",
    normalization: str = "group_std",
    tau: float = 0.1,
    eps: float = 1e-6,
    backend: str = "auto",
    global_weight: float = 0.0,
) -> dict[str, float]:
    """Fill ``value``, ``advantage`` and ``kept`` of every tree; return batch statistics.

    Local term: a group is kept when it has at least two members and the (unbiased) std of its
    values is at least ``tau``; others get advantage 0 (no signal: e.g. all siblings equal).
    Advantage: value minus the group mean, divided by the group std + eps ("group_std"), by nothing
    ("mean_only"), or by the std of the centred values of all kept nodes in the batch ("batch_std").

    Global term (``global_weight`` w > 0; TreeRL's global + local advantage): every non-root node
    also gets w x (its value - the tree's leaf-reward mean), divided by the tree's unbiased
    leaf-reward std + eps ("group_std"), by nothing ("mean_only"), or by the std of the global
    terms of all the batch's trees with signal + eps ("batch_std"). A tree has global signal when
    it has two or more leaves whose reward std is at least ``tau`` (and not 0); otherwise its
    global term is 0. ``kept`` = group kept OR the tree has global signal, so the members of a
    dropped group are trained on their global term alone. w = 0 is the local advantage alone,
    bit for bit; the stats then gain ``global_trees`` (trees with global signal).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown advantage normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    if value_mode not in VALUE_MODES:
        raise ValueError(f"unknown value mode {value_mode!r}; choose one of {VALUE_MODES}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if not (np.isfinite(global_weight) and global_weight >= 0):
        raise ValueError(f"global_weight must be a finite number >= 0 (0: local advantages only), got {global_weight}")
    native = native_module(backend)
    if native is not None:
        stats = _compute_advantages_native(native, trees, value_mode, normalization, tau, eps)
    else:
        stats = _compute_advantages_python(trees, value_mode, normalization, tau, eps)
    if global_weight > 0:
        stats["global_trees"] = _add_global_advantages(trees, normalization, tau, eps, global_weight)
    return stats


def _add_global_advantages(trees: Sequence[Tree], normalization: str, tau: float, eps: float, weight: float) -> int:
    """Add ``weight`` x each non-root node's global advantage (its value against the tree's leaf-reward mean) to
    the local advantages already filled in; mark the nodes of trees with global signal kept. Same NumPy code
    after either backend, so both give the same result. Returns the number of trees with global signal."""
    signal = []  # (tree, global terms of nodes 1..n), normalised per tree unless batch_std
    for tree in trees:
        rewards = tree.reward[tree.is_leaf()]
        if tree.num_nodes < 2 or len(rewards) < 2:
            continue
        std = rewards.std(ddof=1)
        if std < tau or std == 0.0:
            continue
        centred = tree.value[1:] - rewards.mean()
        signal.append((tree, centred / (std + eps) if normalization == "group_std" else centred))
    if normalization == "batch_std" and signal:
        scale = np.concatenate([g for _, g in signal]).std() + eps
        signal = [(tree, g / scale) for tree, g in signal]
    for tree, g in signal:
        advantage = tree.advantage.copy()
        advantage[1:] += weight * g
        kept = tree.kept.copy()
        kept[1:] = True
        tree.advantage, tree.kept = advantage, kept
    return len(signal)


def _compute_advantages_python(
    trees: Sequence[Tree], value_mode: str, normalization: str, tau: float, eps: float
) -> dict[str, float]:
    kept_groups = total_groups = 0
    centred_all = []
    for tree in trees:
        tree.value = _node_values_python(tree, value_mode)
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
    return _stats(total_groups, kept_groups)


def _compute_advantages_native(
    native, trees: Sequence[Tree], value_mode: str, normalization: str, tau: float, eps: float
) -> dict[str, float]:
    """The whole batch in one call; every tree's arrays become views of the batch's."""
    flat = FlatTrees.from_trees(trees)
    out = native.compute_advantages(flat.node_offsets, flat.parent, flat.reward, value_mode, normalization, tau, eps)
    columns = zip(flat.split(out["values"]), flat.split(out["advantages"]), flat.split(out["kept"]), strict=True)
    for tree, (value, advantage, kept) in zip(trees, columns, strict=True):
        tree.value, tree.advantage, tree.kept = value, advantage, kept
    return _stats(out["groups"], out["kept_groups"])


def _stats(groups: int, kept_groups: int) -> dict[str, float]:
    return {
        "groups": groups,
        "kept_groups": kept_groups,
        "kept_group_fraction": kept_groups / groups if groups else 0.0,
    }
