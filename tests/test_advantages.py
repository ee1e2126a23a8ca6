"""Node values and sibling-group advantages against hand-computed trees; GRPO against the textbook formula."""

import numpy as np
import pytest

from treerpo.algorithms.advantages import compute_advantages, node_values, sibling_groups
from treerpo.tree import Tree
from treerpo.trees import native


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
    np.testing.assert_allclose(
        np.concatenate([trees[0].advantage[1:], trees[1].advantage[1:]]), centred / (centred.std() + 1e-6)
    )


def test_grpo_equals_textbook_formula():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 2, size=(6, 8)).astype(float)
    rewards[0] = 1.0  # an all-correct group: no signal
    trees = [make_tree([0] * 8, {i + 1: r for i, r in enumerate(row)}) for row in rewards]
    compute_advantages(trees, tau=0.1)
    for row, tree in zip(rewards, trees, strict=True):
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


# ---- global + local advantages (global_weight) ----------------------------------------------------------------
def two_branch_tree():
    #         0            leaf rewards 1, 0, 1, 1: V(root) = leaf mean 0.75, unbiased leaf std 0.5
    #     1       2        V1 = 0.5, V2 = 1
    #   3   4   5   6      group {5, 6} all 1: dropped locally
    return make_tree([0, 0, 1, 1, 2, 2], {3: 1, 4: 0, 5: 1, 6: 1})


@pytest.mark.parametrize("backend", ["python", "auto"])
def test_global_group_std_hand_computed(backend):
    tree = two_branch_tree()
    stats = compute_advantages([tree], normalization="group_std", tau=0.1, global_weight=0.5, backend=backend)
    np.testing.assert_allclose(tree.value, [0.75, 0.5, 1, 1, 0, 1, 1])
    # local: {1, 2}: -+0.25 / sqrt(0.125) = -+0.70711; {3, 4}: +-0.5 / sqrt(0.5) = +-0.70711; {5, 6}: 0
    # global: (V - 0.75) / 0.5 = -0.5, 0.5, 0.5, -1.5, 0.5, 0.5
    # final = local + 0.5 x global
    expected = [0.0, -0.70711 - 0.25, 0.70711 + 0.25, 0.70711 + 0.25, -0.70711 - 0.75, 0.25, 0.25]
    np.testing.assert_allclose(tree.advantage, expected, rtol=1e-5, atol=1e-5)
    assert tree.kept.tolist() == [False] + [True] * 6  # 5 and 6 on their global term alone
    assert stats == {"groups": 3, "kept_groups": 2, "kept_group_fraction": 2 / 3, "global_trees": 1}


@pytest.mark.parametrize("backend", ["python", "auto"])
def test_global_mean_only_hand_computed(backend):
    tree = two_branch_tree()
    compute_advantages([tree], normalization="mean_only", tau=0.1, global_weight=0.5, backend=backend)
    # local: -0.25, 0.25, 0.5, -0.5, 0, 0; global: -0.25, 0.25, 0.25, -0.75, 0.25, 0.25
    np.testing.assert_allclose(tree.advantage, [0.0, -0.375, 0.375, 0.625, -0.875, 0.125, 0.125], atol=1e-15)
    assert tree.kept.tolist() == [False] + [True] * 6


def test_global_root_is_leaf_mean_whatever_the_value_mode():
    # unbalanced: children_mean gives V(root) = (0.75 + 0 + 2/3) / 3, but the global baseline is the leaf mean 4/7
    tree = unbalanced()
    compute_advantages([tree], value_mode="children_mean", normalization="mean_only", tau=0.1, global_weight=1.0)
    local = unbalanced()
    compute_advantages([local], value_mode="children_mean", normalization="mean_only", tau=0.1)
    np.testing.assert_allclose(tree.advantage[1:] - local.advantage[1:], tree.value[1:] - 4 / 7, atol=1e-15)


def test_global_batch_std():
    trees = [
        make_tree([0, 0], {1: 1, 2: 0}),
        make_tree([0, 0, 0], {1: 1, 2: 1, 3: 0}),
        two_branch_tree(),
        make_tree([0, 0], {1: 1, 2: 1}),
    ]  # the last: all leaves equal, no signal of any kind
    stats = compute_advantages(trees, normalization="batch_std", tau=0.1, global_weight=0.5)
    # mean_only terms (by hand): local centred values of the kept groups, global terms of the trees with signal
    local = [[0.5, -0.5], [1 / 3, 1 / 3, -2 / 3], [-0.25, 0.25, 0.5, -0.5, 0, 0], [0.0, 0.0]]
    glob = [[0.5, -0.5], [1 / 3, 1 / 3, -2 / 3], [-0.25, 0.25, 0.25, -0.75, 0.25, 0.25], [0.0, 0.0]]
    local_scale = np.std([0.5, -0.5, 1 / 3, 1 / 3, -2 / 3, -0.25, 0.25, 0.5, -0.5]) + 1e-6
    global_scale = np.std(glob[0] + glob[1] + glob[2]) + 1e-6
    for tree, lo, gl in zip(trees, local, glob, strict=True):
        np.testing.assert_allclose(
            tree.advantage[1:], np.array(lo) / local_scale + 0.5 * np.array(gl) / global_scale, atol=1e-12
        )
    assert not trees[3].kept.any() and (trees[3].advantage == 0).all()
    assert stats["global_trees"] == 3


def test_global_term_needs_leaf_spread():
    tree = make_tree([0, 0, 1, 1], {2: 1, 3: 1, 4: 1})  # all leaves 1
    before = make_tree([0, 0, 1, 1], {2: 1, 3: 1, 4: 1})
    compute_advantages([before], tau=0.0)
    stats = compute_advantages([tree], tau=0.0, global_weight=2.0)
    assert stats["global_trees"] == 0 and not tree.kept.any() and (tree.advantage == 0).all()
    np.testing.assert_array_equal(tree.advantage, before.advantage)
    # a spread below tau is no signal either: leaves 0.5, 0.5, 0.6 have std 0.0577
    tree = make_tree([0, 0, 0], {1: 0.5, 2: 0.5, 3: 0.6})
    assert compute_advantages([tree], tau=0.1, global_weight=1.0)["global_trees"] == 0
    assert compute_advantages([tree], tau=0.01, global_weight=1.0)["global_trees"] == 1


def test_global_weight_is_validated():
    tree = two_branch_tree()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="global_weight must be a finite number >= 0"):
            compute_advantages([tree], global_weight=bad)


def random_scored_batch(seed):
    from helpers import random_tree

    rng = np.random.default_rng(seed)
    trees = []
    for _ in range(int(rng.integers(1, 5))):
        tree = random_tree(rng, int(rng.integers(0, 25)), shape=str(rng.choice(["random", "chain", "fan"])))
        leaves = tree.is_leaf()
        kind = rng.integers(3)
        tree.reward[leaves] = (
            rng.integers(0, 2, leaves.sum()) if kind == 0 else rng.random(leaves.sum()) if kind == 1 else 0.1
        )
        trees.append(tree)
    return trees


def columns(trees):
    return [(t.value.copy(), t.advantage.copy(), t.kept.copy()) for t in trees]


BACKENDS = ["python"] + (["native"] if native.HAVE_NATIVE else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["group_std", "mean_only", "batch_std"])
def test_global_weight_zero_is_the_local_advantage_exactly(backend, normalization):
    from treerpo.algorithms import advantages as adv

    for seed in range(30):
        for value_mode in ("children_mean", "leaf_mean"):
            trees = random_scored_batch(seed)
            tau = (0.0, 0.1, 0.3)[seed % 3]
            module = native.native_module(backend)
            old = (
                adv._compute_advantages_native(module, trees, value_mode, normalization, tau, 1e-6)
                if module is not None
                else adv._compute_advantages_python(trees, value_mode, normalization, tau, 1e-6)
            )
            expected = columns(trees)
            stats = compute_advantages(trees, value_mode, normalization, tau, backend=backend, global_weight=0.0)
            assert stats == old and "global_trees" not in stats
            for got, want in zip(columns(trees), expected, strict=True):
                for a, b in zip(got, want, strict=True):
                    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not native.HAVE_NATIVE, reason="treerpo._C is not built (pip install -e .)")
@pytest.mark.parametrize("normalization", ["group_std", "mean_only", "batch_std"])
def test_global_native_equals_python(normalization):
    for seed in range(40):
        for value_mode in ("children_mean", "leaf_mean"):
            tau, weight = (0.0, 0.1, 0.3)[seed % 3], (0.5, 1.0, 0.25)[seed % 3]
            trees = random_scored_batch(seed)
            expected = compute_advantages(trees, value_mode, normalization, tau, backend="python", global_weight=weight)
            want = columns(trees)
            assert (
                compute_advantages(trees, value_mode, normalization, tau, backend="native", global_weight=weight)
                == expected
            )
            for got, ref in zip(columns(trees), want, strict=True):
                for a, b in zip(got, ref, strict=True):
                    np.testing.assert_array_equal(a, b)
            # the rule itself: kept nodes are those of kept groups or of trees with signal; unkept nodes have 0
            for tree in trees:
                assert not tree.kept[0] and (tree.advantage[~tree.kept] == 0).all()
