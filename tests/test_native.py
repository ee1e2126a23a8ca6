"""treerpo._C against the Python reference on random trees; invalid input; the fallback when it is not built."""

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treerpo.algorithms.advantages import NORMALIZATIONS, VALUE_MODES, compute_advantages, node_values, sibling_groups
from treerpo.tree import Tree
from treerpo.trees import native
from treerpo.trees.packing import PackedBatch, pack_trees
from treerpo.trees.tile_skip import tile_skip, tile_skip_dense, tile_skip_vectorized

needs_native = pytest.mark.skipif(not native.HAVE_NATIVE, reason="treerpo._C is not built (pip install -e .)")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REWARDS = {  # leaf rewards: verifier scores, arbitrary floats, all equal (0.1 sums inexactly), tiny spreads
    "binary": st.sampled_from([0.0, 1.0]),
    "graded": st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    "float": st.floats(-100, 100, allow_nan=False),
    "equal": st.just(0.1),
    "tiny": st.sampled_from([0.5, 0.5 + 1e-9]),
}


@st.composite
def trees(draw, max_nodes: int = 14) -> Tree:
    """Any shape: chains, fans, random parents; empty and one-token segments (early EOS); scored leaves."""
    n = draw(st.integers(0, max_nodes))
    shape = draw(st.sampled_from(["random", "chain", "fan"]))
    parents = [{"chain": i - 1, "fan": 0}.get(shape) for i in range(1, n + 1)]
    parents = [p if p is not None else draw(st.integers(0, i - 1)) for i, p in enumerate(parents, start=1)]
    lengths = draw(st.lists(st.integers(0, 3), min_size=n + 1, max_size=n + 1))
    tree = Tree.from_segments(
        list(range(3, 3 + lengths[0])), parents, [list(range(3, 3 + k)) for k in lengths[1:]], [False] * n
    )
    leaves = tree.leaves()
    tree.reward[leaves] = draw(
        st.lists(REWARDS[draw(st.sampled_from(sorted(REWARDS)))], min_size=len(leaves), max_size=len(leaves))
    )
    tree.kept = np.array(draw(st.lists(st.booleans(), min_size=n + 1, max_size=n + 1)))
    tree.advantage = np.array(draw(st.lists(st.floats(-3, 3), min_size=n + 1, max_size=n + 1)))
    return tree


batches = st.lists(trees(), min_size=0, max_size=4)


def flat(batch):
    return native.FlatTrees.from_trees(batch, with_tokens=True)


def assert_packed_equal(a: PackedBatch, b: PackedBatch):
    for name in PackedBatch.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


# ---- equality with the Python reference ---------------------------------------------------------------
@needs_native
@SETTINGS
@given(batches, st.sampled_from(VALUE_MODES), st.sampled_from(NORMALIZATIONS), st.sampled_from([0.0, 0.1, 0.3]))
def test_advantages_equal_reference(batch, value_mode, normalization, tau):
    expected = compute_advantages(batch, value_mode, normalization, tau, backend="python")
    reference = [(t.value.copy(), t.advantage.copy(), t.kept.copy()) for t in batch]
    assert compute_advantages(batch, value_mode, normalization, tau, backend="native") == expected
    for tree, columns in zip(batch, reference, strict=True):
        for got, want in zip((tree.value, tree.advantage, tree.kept), columns, strict=True):
            np.testing.assert_array_equal(got, want)  # bit for bit: the tau filter decides alike


@needs_native
@SETTINGS
@given(trees(), st.sampled_from(VALUE_MODES))
def test_node_values_equal_reference(tree, mode):
    np.testing.assert_array_equal(node_values(tree, mode, backend="native"), node_values(tree, mode, backend="python"))


@needs_native
@SETTINGS
@given(batches)
def test_sibling_groups_and_statistics(batch):
    f = flat(batch)
    values = np.concatenate([node_values(t, backend="python") for t in batch] or [np.zeros(0)])
    g = native._C.sibling_groups(f.node_offsets, f.parent, values)
    groups = np.split(g["members"], g["offsets"][1:-1]) if len(g["parent"]) else []
    expected = [
        (grp + base, t.parent[grp[0]] + base)
        for t, base in zip(batch, f.node_offsets[:-1], strict=True)
        for grp in sibling_groups(t)
    ]
    assert [x.tolist() for x in groups] == [members.tolist() for members, _ in expected]
    assert g["parent"].tolist() == [p for _, p in expected]
    for k, members in enumerate(groups):
        assert g["mean"][k] == values[members].mean()
        assert g["std"][k] == (values[members].std(ddof=1) if len(members) > 1 else 0.0)


@needs_native
@SETTINGS
@given(batches, st.booleans())
def test_packing_equals_reference(batch, prune):
    assert_packed_equal(pack_trees(batch, prune, backend="native"), pack_trees(batch, prune, backend="python"))


@needs_native
@SETTINGS
@given(batches, st.booleans(), st.integers(1, 9), st.integers(1, 9), st.integers(0, 5))
def test_tile_skip_equals_dense_mask(batch, prune, block_q, block_k, shift):
    b = pack_trees(batch, prune)
    tin, tout = b.tin + shift, b.tout + shift  # a slice of a longer buffer
    expected = tile_skip_dense(tin, tout, block_q, block_k)
    for got in (
        tile_skip(tin, tout, block_q, block_k, backend="native"),  # int32, as packed
        tile_skip(tin.long(), tout.long(), block_q, block_k, backend="native"),
        tile_skip_vectorized(tin, tout, block_q, block_k),
    ):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@needs_native
def test_tile_skip_with_gaps_in_tin():
    """tin need only increase: a query row sees key k iff tin[k] <= tin[q] < tout[k]."""
    rng = np.random.default_rng(0)
    tin = np.cumsum(rng.integers(1, 4, size=200)).astype(np.int32)
    tout = (tin + rng.integers(1, 40, size=200)).astype(np.int32)
    expected = tile_skip_dense(tin, tout, 16, 8)
    for got in (tile_skip(tin, tout, 16, 8, backend="native"), tile_skip_vectorized(tin, tout, 16, 8)):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@needs_native
def test_default_tiles_of_a_real_tree():
    """A chain packs causally: query tile i visits key tiles 0..i."""
    tree = Tree.from_segments(list(range(100)), [0, 1], [list(range(100)), list(range(56))], [False, True])
    batch = pack_trees([tree])
    offsets, key_tiles = tile_skip(batch.tin, batch.tout)
    assert offsets.tolist() == [0, 1, 3, 6, 10]
    assert key_tiles.tolist() == [0, 0, 1, 0, 1, 2, 0, 1, 2, 3]


# ---- zero copy -------------------------------------------------------------------------------------------
@needs_native
def test_results_are_not_copied():
    tree = Tree.from_segments([1, 2], [0, 0], [[3], [4, 5]], [True, True])
    f = flat([tree])
    cols = native._C.pack(f.node_offsets, f.parent, f.token_offsets, f.token_ids, f.kept, f.advantage)
    assert not cols["input_ids"].flags.owndata and cols["input_ids"].base is not None  # the C++ buffer itself
    batch = pack_trees([tree])
    assert batch.tin.numpy().base is not None  # torch.from_numpy: a view of it
    tin, tout = torch.arange(8, dtype=torch.int32), torch.full((8,), 8, dtype=torch.int32)
    offsets, key_tiles = native._C.tile_skip(tin, tout, 4, 4)  # CPU torch tensors go in as they are
    assert offsets.tolist() == [0, 1, 3] and key_tiles.tolist() == [0, 0, 1]


# ---- invalid input -----------------------------------------------------------------------------------
BAD_PARENTS = {
    "out of range": ([-1, 0, 5], "out of range"),
    "negative": ([-1, 0, -3], "out of range"),
    "second root": ([-1, -1], "out of range"),
    "root with a parent": ([0, 0], "root"),
    "self loop": ([-1, 1], "cycle"),
    "cycle": ([-1, 0, 3, 2], "cycle"),
    "parent after child": ([-1, 2, 0], "before its children"),
}


@needs_native
@pytest.mark.parametrize("case", sorted(BAD_PARENTS))
def test_bad_parents_are_refused(case):
    parent, message = BAD_PARENTS[case]
    node_offsets = np.array([0, 1, 1 + len(parent)])  # a good one-node tree, then the bad one
    parent = np.array([-1, *parent], dtype=np.int64)
    reward = np.ones(len(parent))
    with pytest.raises(ValueError, match=f"tree 1: .*{message}"):
        native._C.compute_advantages(node_offsets, parent, reward)
    with pytest.raises(ValueError, match=message):
        native._C.pack(
            node_offsets,
            parent,
            np.arange(len(parent) + 1),
            np.arange(len(parent)),
            np.ones(len(parent), dtype=bool),
            reward,
        )
    with pytest.raises(ValueError, match=message):
        native._C.sibling_groups(node_offsets, parent)


@needs_native
def test_a_bad_tree_object_is_refused():
    tree = Tree.from_segments([1], [0, 1], [[2], [3]], [False, True])
    tree.parent[1] = 2  # 1 -> 2 -> 1
    with pytest.raises(ValueError, match="cycle"):
        pack_trees([tree], backend="native")
    with pytest.raises(ValueError, match="cycle"):
        compute_advantages([tree], backend="native")


@needs_native
@pytest.mark.parametrize(
    "node_offsets, message",
    [
        ([], "node_offsets"),
        ([1, 3], "start at 0"),
        ([0, 2, 2], "no nodes"),
        ([0, 2], "end at len"),
        ([0, 5], "past the end"),
    ],
)
def test_bad_node_offsets_are_refused(node_offsets, message):
    with pytest.raises(ValueError, match=message):
        native._C.node_values(np.array(node_offsets, dtype=np.int64), np.array([-1, 0, 0]), np.ones(3))


@needs_native
def test_bad_lengths_tokens_and_options_are_refused():
    offsets, parent = np.array([0, 2]), np.array([-1, 0])
    with pytest.raises(ValueError, match="reward must be 1-D with 2 entries"):
        native._C.node_values(offsets, parent, np.ones(3))
    with pytest.raises(ValueError, match="score the tree"):
        native._C.node_values(offsets, parent, np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="unknown value mode"):
        native._C.node_values(offsets, parent, np.ones(2), "median")
    with pytest.raises(ValueError, match="unknown advantage normalization"):
        native._C.compute_advantages(offsets, parent, np.ones(2), normalization="rank")
    with pytest.raises(ValueError, match="tau"):
        native._C.compute_advantages(offsets, parent, np.ones(2), tau=-1.0)

    def pack(token_offsets):
        return native._C.pack(
            offsets, parent, np.array(token_offsets), np.arange(3), np.ones(2, dtype=bool), np.zeros(2)
        )

    with pytest.raises(ValueError, match="non-decreasing"):
        pack([0, 2, 1])
    with pytest.raises(ValueError, match="end at len"):
        pack([0, 1, 2])
    with pytest.raises(ValueError, match="token_offsets must be 1-D with 3"):
        pack([0, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        tile_skip(np.array([0, 2, 1]), np.array([3, 3, 3]), backend="native")
    with pytest.raises(ValueError, match="block_q"):
        tile_skip(np.arange(3), np.full(3, 3), block_q=0, backend="native")


def test_tile_skip_vectorized_refuses_unsorted_tin():
    with pytest.raises(ValueError, match="strictly increasing"):
        tile_skip_vectorized(torch.tensor([0, 2, 1]), torch.tensor([3, 3, 3]))


# ---- choosing the implementation -----------------------------------------------------------------------
def test_fallback_warns_once_and_matches_reference(monkeypatch, caplog):
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.delenv("TREERPO_NATIVE", raising=False)
    tree = Tree.from_segments([1], [0, 0, 1, 1], [[2], [3], [4], [5]], [False] * 4)
    tree.reward[[2, 3, 4]] = [1.0, 0.0, 1.0]
    with caplog.at_level(logging.WARNING, logger="treerpo.trees.native"):
        compute_advantages([tree], tau=0.0)
        batch = pack_trees([tree])
    warnings = [r for r in caplog.records if r.name == "treerpo.trees.native"]
    assert len(warnings) == 1 and "pip install -e ." in warnings[0].getMessage()
    assert_packed_equal(batch, pack_trees([tree], backend="python"))
    with pytest.raises(RuntimeError, match="not built"):
        pack_trees([tree], backend="native")


def test_environment_selects_python_quietly(monkeypatch, caplog):
    monkeypatch.setenv("TREERPO_NATIVE", "0")
    monkeypatch.setattr(native, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="treerpo.trees.native"):
        assert native.native_module() is None
    assert not [r for r in caplog.records if r.name == "treerpo.trees.native"]
    with pytest.raises(ValueError, match="unknown backend"):
        native.native_module("cuda")


@needs_native
def test_native_is_the_default(monkeypatch):
    monkeypatch.delenv("TREERPO_NATIVE", raising=False)
    assert native.native_module() is native._C


@needs_native
def test_all_equal_rewards_decide_alike():
    """Three leaves of 0.1: numpy's mean is not exactly 0.1, so the std is 1.7e-17, not 0, and tau = 0 keeps
    the group; the C++ sums like numpy and keeps it too."""
    trees = [Tree.from_segments([1], [0, 0, 0], [[2]] * 3, [True] * 3) for _ in range(2)]
    for tree in trees:
        tree.reward[1:] = 0.1
    results = []
    for backend in ("python", "native"):
        compute_advantages(trees, tau=0.0, backend=backend)
        results.append([t.kept.copy() for t in trees])
    assert results[0][0].tolist() == results[1][0].tolist() == [False, True, True, True]
