"""A rollout's metrics under TRL's names equal TRL's own formulas applied to the trees taken as rows (one row a
leaf: prompt + path), as GRPOTrainer computes them (trl/trainer/grpo_trainer.py, 1.16)."""

import numpy as np
import pytest
import torch

from treerpo.integrations.trl_metrics import rollout_metrics, row_tokens
from treerpo.tree import Tree

EOS = 99


def two_by_two(prompt_len: int, seed: int) -> Tree:
    """A (2, 2) tree: 2 children of the prompt, 2 leaves under each; some leaves end with EOS."""
    rng = np.random.default_rng(seed)
    segments, finished = [], []
    for node in range(6):
        length = int(rng.integers(1, 6))
        ends = node >= 2 and bool(rng.integers(0, 2))
        segments.append(list(rng.integers(1, 50, length)) + ([EOS] if ends else []))
        finished.append(ends)
    return Tree.from_segments(list(range(1, prompt_len + 1)), [0, 0, 1, 1, 2, 2], segments, finished)


def trl_reference(trees, rewards: torch.Tensor, per_func: torch.Tensor, group: int) -> dict:
    """TRL's computations on rows: completion ids per row, rewards [rows], per-function rewards [rows, k]."""
    rows = [(t, t.path_token_ids(leaf, include_prompt=False).tolist()) for t in trees for leaf in t.leaves()]
    prompt_lengths = torch.tensor([len(t.prompt_ids) for t, _ in rows])
    completion_lengths = torch.tensor([len(c) for _, c in rows])
    is_truncated = torch.tensor([c[-1] != EOS for _, c in rows])
    terminated = completion_lengths[~is_truncated]
    std_rewards = rewards.view(-1, group).std(dim=1).repeat_interleave(group)
    out = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item(),
        "frac_reward_zero_std": torch.isclose(std_rewards, torch.zeros_like(std_rewards)).float().mean().item(),
        "completions/mean_length": completion_lengths.float().mean().item(),
        "completions/min_length": completion_lengths.float().min().item(),
        "completions/max_length": completion_lengths.float().max().item(),
        "completions/clipped_ratio": is_truncated.float().mean().item(),
        "completions/mean_terminated_length": terminated.float().mean().item(),
        "completions/min_terminated_length": terminated.float().min().item(),
        "completions/max_terminated_length": terminated.float().max().item(),
        "num_tokens": (prompt_lengths.sum() + completion_lengths.sum()).item(),
    }
    for i, name in enumerate(["correct", "format"]):
        out[f"rewards/{name}/mean"] = per_func[:, i].mean().item()
        out[f"rewards/{name}/std"] = per_func[:, i].std().item()
    return out


def test_trl_named_metrics_are_trls_quantities():
    trees = [two_by_two(prompt_len, seed) for seed, prompt_len in enumerate((5, 9, 3))]
    per_func = torch.tensor(
        [[1.0, 0.5], [0.0, 0.5], [1.0, 0.0], [0.0, 1.0]]  # a tree whose rewards differ
        + [[1.0, 0.0]] * 4  # a tree whose leaves all score alike: zero std
        + [[0.0, 0.5], [1.0, 0.5], [0.0, 0.5], [1.0, 0.0]],
        dtype=torch.float64,
    )
    rewards = per_func.sum(dim=1)
    leaf_tree = np.repeat(np.arange(3), 4)
    got = rollout_metrics(trees, leaf_tree, rewards.numpy(), per_func.numpy(), ["correct", "format"])
    expected = trl_reference(trees, rewards, per_func, group=4)
    assert row_tokens(trees) == expected.pop("num_tokens")
    assert got["frac_reward_zero_std"] == pytest.approx(1 / 3)
    assert 0 < got["completions/clipped_ratio"] < 1  # both kinds of leaves are in the case
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6), name  # TRL takes float32 means
    assert got["tree/distinct_tokens"] == sum(t.num_tokens for t in trees) < row_tokens(trees)
