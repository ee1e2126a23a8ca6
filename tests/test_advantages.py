"""Node values and sibling-group advantages against hand-computed trees; GRPO against the textbook formula."""
import numpy as np
import pytest

from treerpo.algorithms.advantages import compute_advantages, node_values, sibling_groups
from treerpo.tree import Tree


def make_tree(parents, leaf_rewards):
    """``parents`` for nodes 1..n (root = 0); ``leaf_rewards`` maps leaf node -> reward."""
    tree = Tree.from_segments([1], parents, [[2]] * len(parents), [False] * len(parents))
    for node, r in leaf_rewards.items():
        tree.reward[node] = r
    return tree


def unbalanced():
    #            0
    #      1     2      3
    #    4  5    (leaf) 6 7 8
    #   9 10
    return make_tree([0, 0, 0, 1, 1, 3, 3, 3, 4, 4], {9: 1, 10: 0, 5: 1, 2: 0, 6: 1, 7: 1, 8: 0})


def test_children_mean_values_hand_computed():
    v = node_values(unbalanced(), "children_mean")
    assert v[4] == pytest.approx(0.5)  # (1 + 0) / 2
    assert v[1] == pytest.approx(0.75)  # (0.5 + 1) / 2
    assert v[3] == pytest.approx(2 / 3)
    assert v[0] == pytest.approx((0.75 + 0 + 2 / 3) / 3)


def test_leaf_mean_values_hand_computed():
    v = node_values(unbalanced(), "leaf_mean")
    assert v[1] == pytest.approx(2 / 3)  # leaves 9, 10, 5 -> (1 + 0 + 1) / 3
    assert v[0] == pytest.approx(4 / 7)  # all seven leaves


def test_group_std_advantages_hand_computed():
    tree = unbalanced()
    stats = compute_advantages([tree], tau=0.1)
    # root group {1, 2, 3}: values 0.75, 0, 2/3
    v = np.array([0.75, 0.0, 2 / 3])
    expected = (v - v.mean()) / (v.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(tree.advantage[[1, 2, 3]], expected, rtol=1e-9)
    # group {9, 10}: values 1, 0 -> mean 0.5, unbiased std sqrt(0.5)
    np.testing.assert_allclose(tree.advantage[[9, 10]], [0.5 / (np.sqrt(0.5) + 1e-6), -0.5 / (np.sqrt(0.5) + 1e-6)])
    # group {4, 5}: 0.5 and 1
    np.testing.assert_allclose(tree.advantage[[4, 5]], [-0.25, 0.25] / (np.std([0.5, 1.0], ddof=1) + 1e-6))
    assert stats == {"groups": 4, "kept_groups": 4, "kept_group_fraction": 1.0}
    assert tree.kept.tolist() == [False] + [True] * 10


def test_all_equal_group_is_filtered():
    tree = make_tree([0, 0, 1, 1, 2, 2], {3: 1, 4: 1, 5: 0, 6: 1})
    stats = compute_advantages([tree], tau=0.0)
    assert not tree.kept[3] and not tree.kept[4]  # {3, 4} both 1: no signal even with tau = 0
    assert tree.advantage[3] == 0 and tree.advantage[4] == 0
    assert tree.kept[5] and tree.kept[6]
    assert stats["kept_groups"] == 2  # root group {1: 1.0, 2: 0.5} and {5, 6}


def test_tau_filter_threshold():
    # group {1, 2, 3, 4} values 0.5, 0.5, 0.5, 0.6: unbiased std 0.05 < 0.1, dropped; kept at tau 0.01
    tree = make_tree([0, 0, 0, 0, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4], {})
    tree.reward[[2, 3]] = 0.5
    tree.reward[[5, 6]] = [1, 0]
    tree.reward[7:17] = [1] * 6 + [0] * 4
    v = node_values(tree)
    assert v[[1, 2, 3, 4]] == pytest.approx([0.5, 0.5, 0.5, 0.6])
    compute_advantages([tree], tau=0.1)
    assert not tree.kept[1:5].any()
    compute_advantages([tree], tau=0.01)
    assert tree.kept[1:5].all()


def test_single_child_group_has_no_advantage():
    tree = make_tree([0, 1, 1], {2: 1, 3: 0})
    compute_advantages([tree], tau=0.0)
    assert not tree.kept[1] and tree.advantage[1] == 0
    assert tree.kept[2] and tree.kept[3]


def test_mean_only_and_batch_std():
    trees = [make_tree([0, 0], {1: 1, 2: 0}), make_tree([0, 0, 0], {1: 1, 2: 1, 3: 0})]
    compute_advantages(trees, normalization="mean_only", tau=0.0)
    np.testing.assert_allclose(trees[0].advantage[1:], [0.5, -0.5])
    np.testing.assert_allclose(trees[1].advantage[1:], [1 / 3, 1 / 3, -2 / 3])
    compute_advantages(trees, normalization="batch_std", tau=0.0)
    centred = np.array([0.5, -0.5, 1 / 3, 1 / 3, -2 / 3])
    np.testing.assert_allclose(np.concatenate([trees[0].advantage[1:], trees[1].advantage[1:]]),
                               centred / (centred.std() + 1e-6))


def test_grpo_equals_textbook_formula():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, size=(6, 8)).astype(float)
    rewards[0] = 1.0  # an all-correct group: no signal
    trees = [make_tree([0] * 8, {i + 1: r for i, r in enumerate(row)}) for row in rewards]
    compute_advantages(trees, tau=0.1)
    for row, tree in zip(rewards, trees):
        std = row.std(ddof=1)
        textbook = np.zeros(8) if std == 0 else (row - row.mean()) / (std + 1e-6)
        np.testing.assert_allclose(tree.advantage[1:], textbook, atol=1e-12)


def test_sibling_groups_partition_non_root_nodes():
    tree = unbalanced()
    groups = sibling_groups(tree)
    assert sorted(np.concatenate(groups).tolist()) == list(range(1, tree.num_nodes))
    for g in groups:
        assert len(set(tree.parent[g].tolist())) == 1


def test_unscored_leaf_is_refused():
    tree = make_tree([0, 0], {1: 1})
    with pytest.raises(ValueError, match="score the tree"):
        node_values(tree)


def test_completion_lengths_equal_the_leaf_paths():
    from helpers import random_tree

    rng = np.random.default_rng(11)
    for n in (0, 1, 7, 30):
        tree = random_tree(rng, n)
        expected = [len(tree.path_token_ids(int(leaf), include_prompt=False)) for leaf in tree.leaves()]
        assert tree.completion_lengths().tolist() == expected
