"""flatten_trees: rows of root-to-leaf completions whose token weights reproduce the packed tree's loss."""

import numpy as np
import pytest

from helpers import random_tree
from treerpo.tree import Tree
from treerpo.trees.flatten import flatten_trees, leaves_below
from treerpo.trees.packing import pack_trees
from treerpo.trees.token_weights import loss_token_count


def hand_tree() -> Tree:
    # root [1, 2]; node 1 [3, 4] and node 2 [5] under the root; nodes 3 [6] and 4 [7, 8] under node 1
    tree = Tree.from_segments([1, 2], [0, 0, 1, 1], [[3, 4], [5], [6], [7, 8]], [False, True, True, True])
    tree.kept = np.array([False, True, False, True, True])
    tree.advantage = np.array([0.0, 0.5, -0.5, 1.0, -1.0])
    tree.token_logprobs = np.array([np.nan, np.nan, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6])
    return tree


def test_hand_computed_rows_weights_and_advantages():
    tree = hand_tree()
    assert leaves_below(tree).tolist() == [3, 2, 1, 1, 1]
    flat = flatten_trees([tree])
    assert flat.rows == [(0, 2), (0, 3), (0, 4)]
    assert flat.prompt_ids == [[1, 2]] * 3
    assert flat.completion_ids == [[5], [3, 4, 6], [3, 4, 7, 8]]
    assert flat.sampling_logprobs == [[-0.3], [-0.1, -0.2, -0.4], [-0.1, -0.2, -0.5, -0.6]]
    assert [w.tolist() for w in flat.token_weights] == [[0.0], [0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]
    assert [a.tolist() for a in flat.token_advantages] == [[0.0], [0.25, 0.25, 1.0], [0.25, 0.25, -1.0, -1.0]]
    assert flat.loss_tokens == 5
    padded = flat.padded(flat.token_weights)
    assert padded.shape == (3, 4) and padded[0].tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("seed", range(6))
def test_weighted_row_sums_equal_sums_over_the_packed_loss_tokens(seed):
    rng = np.random.default_rng(seed)
    trees = [random_tree(rng, int(rng.integers(1, 12))) for _ in range(3)]
    value = rng.normal(size=64)  # any per-token function of the token id
    flat = flatten_trees(trees)
    rows_sum = sum(
        float((w * value[np.asarray(c)]).sum()) for w, c in zip(flat.token_weights, flat.completion_ids, strict=True)
    )
    adv_sum = sum(
        float((a * value[np.asarray(c)]).sum()) for a, c in zip(flat.token_advantages, flat.completion_ids, strict=True)
    )
    packed = pack_trees(trees)
    mask = packed.loss_mask.numpy()
    ids = packed.input_ids.numpy()[mask]
    assert np.isclose(rows_sum, value[ids].sum())
    assert np.isclose(adv_sum, (packed.advantages.numpy()[mask] * value[ids]).sum(), atol=1e-5)
    assert flat.loss_tokens == sum(map(loss_token_count, trees)) == int(mask.sum())
