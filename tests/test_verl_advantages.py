"""treerpo.integrations.verl.advantages (no verl needed): trees rebuilt from verl samples' fields give each sample
the per-token advantages of ``flatten_trees`` on the original trees, whatever the samples' order and padding."""

import numpy as np
import pytest

from helpers import random_tree
from treerpo.algorithms.advantages import compute_advantages
from treerpo.integrations.verl.advantages import leaf_fields, sample_advantages, verl_token_mean_scale
from treerpo.trees.flatten import flatten_trees


def _trees_with_rewards(seed: int):
    rng = np.random.default_rng(seed)
    trees = [random_tree(rng, 7), random_tree(rng, 5, shape="fan"), random_tree(rng, 4, shape="chain")]
    for tree in trees:
        for leaf in tree.leaves():
            tree.reward[leaf] = float(rng.integers(0, 2))
    return trees


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_samples_get_flatten_trees_advantages(seed):
    trees = _trees_with_rewards(seed)
    compute_advantages(trees)
    expected = flatten_trees(trees)
    # verl's view: one sample a leaf, shuffled, with padding rows (no tree fields) among them
    samples, rewards, origin = [], [], []
    for t, tree in enumerate(trees):
        for leaf in tree.leaves():
            samples.append(leaf_fields(tree, int(leaf), key=f"tree{t}"))
            rewards.append(tree.reward[leaf])
            origin.append((t, int(leaf)))
    order = np.random.default_rng(seed).permutation(len(samples)).tolist()
    samples = [samples[i] for i in order] + [None, None]
    rewards = [rewards[i] for i in order] + [0.0, 0.0]
    origin = [origin[i] for i in order]
    got = sample_advantages(samples, rewards)
    assert got.loss_tokens == expected.loss_tokens
    by_row = dict(zip(expected.rows, expected.token_advantages, strict=True))
    for i, row in enumerate(origin):
        np.testing.assert_allclose(got.advantages[i], by_row[row], rtol=0, atol=1e-12)
    assert got.advantages[-1] is None and got.advantages[-2] is None
    assert any(np.any(a != 0) for a in got.advantages if a is not None), "the case should carry some signal"


def test_a_tree_with_a_missing_leaf_is_refused():
    trees = _trees_with_rewards(3)
    tree = trees[0]
    leaves = [int(x) for x in tree.leaves()]
    samples = [leaf_fields(tree, leaf, key="t") for leaf in leaves[1:]]
    with pytest.raises(ValueError, match="every leaf of a tree must be in the same batch"):
        sample_advantages(samples, [1.0] * len(samples))


def test_token_mean_scale_by_hand():
    """Two leaves sharing a 3-token node, own nodes of 2 and 1 tokens: verl's token-mean divides by 3+2 + 3+1 = 9
    tokens, treerpo's by 3+2+1 = 6 distinct ones: advantages x 9/6 make the two equal."""
    assert verl_token_mean_scale(9, 6) == 1.5
    assert verl_token_mean_scale(5, 0) == 0.0
