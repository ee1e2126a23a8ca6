"""A rollout's metrics under TRL's names, meaning TRL's quantities (one row a leaf: the prompt plus the leaf's
path), and the tree's own quantities under ``tree/*`` names."""

from __future__ import annotations

import numpy as np

from treerpo.tree import Tree


def unbiased_std(values: np.ndarray) -> float:
    """TRL's ``nanstd``: the standard deviation with Bessel's correction, NaN ignored (NaN below two values)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def rollout_metrics(
    trees: list[Tree], leaf_tree: np.ndarray, rewards: np.ndarray, per_func: np.ndarray, func_names: list[str]
) -> dict[str, float]:
    """``leaf_tree[i]``: the tree of leaf i (the order of ``rewards`` and ``per_func`` rows, tree by tree in
    ``Tree.leaves()`` order); ``per_func`` [leaves, functions], NaN where a function gave no score."""
    out: dict[str, float] = {}
    for i, name in enumerate(func_names):
        out[f"rewards/{name}/mean"] = float(np.nanmean(per_func[:, i]))
        out[f"rewards/{name}/std"] = unbiased_std(per_func[:, i])
    out["reward"] = float(np.mean(rewards))
    out["reward_std"] = unbiased_std(rewards)
    group_std = {t: unbiased_std(rewards[leaf_tree == t]) for t in np.unique(leaf_tree)}
    out["frac_reward_zero_std"] = float(np.mean([np.isclose(group_std[t], 0.0) for t in leaf_tree]))
    lengths = np.concatenate([t.completion_lengths() for t in trees]).astype(np.float64)
    truncated = np.concatenate([~t.finished[t.leaves()] for t in trees])
    terminated = lengths[~truncated] if (~truncated).any() else np.zeros(1)
    out.update(
        {
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated.mean()),
            "completions/mean_terminated_length": float(terminated.mean()),
            "completions/min_terminated_length": float(terminated.min()),
            "completions/max_terminated_length": float(terminated.max()),
            "tree/leaves": float(len(rewards)),
            "tree/distinct_tokens": float(sum(t.num_tokens for t in trees)),
            "tokens/generated": float(sum(t.generated_tokens for t in trees)),
        }
    )
    return out


def row_tokens(trees: list[Tree]) -> int:
    """The tokens TRL counts in ``num_tokens`` for these trees as rows: each leaf's prompt plus its completion."""
    return int(sum(len(t.leaves()) * len(t.prompt_ids) + t.completion_lengths().sum() for t in trees))
