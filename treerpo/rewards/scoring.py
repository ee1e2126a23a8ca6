"""Score trees: a reward function on the text of every root-to-leaf path."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from treerpo.tree import Tree

RewardFn = Callable[[list[str], list[str]], list[float]]


def leaf_completions(trees: Sequence[Tree], tokenizer) -> tuple[list[tuple[int, int]], list[str]]:
    """(tree, leaf) pairs and the decoded completion (prompt excluded) of each."""
    keys, token_lists = [], []
    for t, tree in enumerate(trees):
        for leaf in tree.leaves():
            if leaf == 0:
                continue
            keys.append((t, int(leaf)))
            token_lists.append(tree.path_token_ids(int(leaf), include_prompt=False).tolist())
    return keys, tokenizer.batch_decode(token_lists, skip_special_tokens=True)


def score_trees(trees: Sequence[Tree], tokenizer, reward_fn: RewardFn, gold_key: str = "answer") -> np.ndarray:
    """Set ``reward`` on every leaf from ``reward_fn(completions, golds)``; returns the leaf rewards."""
    keys, texts = leaf_completions(trees, tokenizer)
    golds = [trees[t].info[gold_key] for t, _ in keys]
    rewards = np.asarray(reward_fn(texts, golds), dtype=float)
    if rewards.shape != (len(keys),):
        raise ValueError(f"the reward function returned {rewards.shape} scores for {len(keys)} completions")
    for (t, leaf), r in zip(keys, rewards, strict=True):
        trees[t].reward[leaf] = r
    return rewards
