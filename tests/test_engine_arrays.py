"""The array-based engine's pieces against independent references: decode inputs against the per-sequence
metadata builder, counter-based seeds against their properties, node records against a hand-built tree."""

import numpy as np
import pytest
import torch

from treerpo.attention.paged import PagedAttentionMetadata
from treerpo.engine.block_manager import PathTable
from treerpo.engine.branch_seeds import child_seeds, root_seeds, uniforms
from treerpo.engine.kv_pool import KVPool
from treerpo.engine.sequence import ROOT, Branches, NodeRecords
from treerpo.engine.step_builder import HostStaging, decode_inputs


def random_branches(rng, paths: PathTable, segment: int, count: int) -> Branches:
    n = rng.integers(1, segment + 1, count)
    own = rng.integers(0, 4096, (count, segment))
    path = rng.integers(0, paths.count, count)
    zeros = np.zeros(count, dtype=np.int64)
    return Branches(
        tree=zeros,
        parent=zeros,
        child=zeros,
        depth=zeros + 1,
        code=zeros,
        path=path,
        seed=np.zeros(count, np.uint64),
        n=n,
        tokens=rng.integers(0, 50, (count, segment)),
        logprobs=np.zeros((count, segment)),
        own_slots=own,
    )


@pytest.mark.parametrize("cascade", [False, True])
def test_decode_inputs_equal_the_per_sequence_builder(cascade):
    rng = np.random.default_rng(0)
    pool = KVPool(2, 2, 4, num_pages=4096)
    paths = PathTable(12)
    lengths = rng.integers(1, 13, 5)
    paths.add(rng.integers(0, 4096, (5, 12)), lengths)
    branches = random_branches(rng, paths, segment=6, count=9)
    got = decode_inputs(branches, paths, pool, HostStaging("cpu"), cascade)
    # reference: one (cached slots, new slot) pair per branch, through PagedAttentionMetadata.build
    own_before = [branches.own_slots[b, : branches.n[b] - 1] for b in range(len(branches))]
    new = [branches.own_slots[b, branches.n[b] - 1 : branches.n[b]] for b in range(len(branches))]
    path_slots = [paths.slots[p, : paths.length[p]] for p in range(paths.count)]
    if cascade:
        used, group = np.unique(branches.path, return_inverse=True)
        ref = PagedAttentionMetadata.build(
            pool, list(zip(own_before, new, strict=True)), "cpu", [path_slots[p] for p in used], group
        )
        for name in (
            "prefix_len",
            "group_of_seq",
            "member_rows",
            "rank_in_group",
            "members",
            "member_start",
            "prefix_rows",
            "suffix_rows",
            "prefix_padding",
            "suffix_padding",
        ):
            assert torch.equal(getattr(got.meta.groups, name), getattr(ref.groups, name)), name
    else:
        full = [np.concatenate([path_slots[branches.path[b]], own_before[b]]) for b in range(len(branches))]
        ref = PagedAttentionMetadata.build(pool, list(zip(full, new, strict=True)), "cpu")
    for name in ("write_slots", "query_rows", "query_key_pos"):
        assert torch.equal(getattr(got.meta, name), getattr(ref, name)), name
    valid = torch.arange(ref.kv_slots.shape[1])[None] <= ref.query_key_pos
    assert torch.equal(got.meta.kv_slots[valid], ref.kv_slots[valid])
    expected_tokens = [branches.tokens[b, branches.n[b] - 1] for b in range(len(branches))]
    assert got.input_ids[0].tolist() == expected_tokens
    expected_pos = [paths.length[branches.path[b]] + branches.n[b] - 1 for b in range(len(branches))]
    assert got.position_ids[0].tolist() == expected_pos


def test_path_table_extends_a_path_by_a_segment():
    paths = PathTable(8)
    first = paths.add(np.array([[5, 6, 7]]), np.array([3]))
    ids = paths.extended(np.array([first[0], first[0]]), np.array([[1, 2], [3, 4]]), np.array([2, 1]))
    assert [paths.slots[i, : paths.length[i]].tolist() for i in ids] == [[5, 6, 7, 1, 2], [5, 6, 7, 3]]
    many = paths.add(np.zeros((40, 2), dtype=np.int64), np.full(40, 2))  # grows past its first capacity
    assert many[-1] == 42 and paths.length[ids].tolist() == [5, 4]


def test_uniforms_are_uniform_and_independent_of_the_batch():
    seeds = child_seeds(root_seeds(np.arange(64))[:, None], np.arange(64)[None]).reshape(-1)
    u = uniforms(seeds, 0)
    assert len(np.unique(seeds)) == len(seeds)
    assert 0 <= u.min() and u.max() < 1
    # Kolmogorov-Smirnov distance of 4,096 uniforms: well under the 1% critical value 1.63 / sqrt(n)
    assert np.abs(np.sort(u) - (np.arange(len(u)) + 0.5) / len(u)).max() < 1.63 / np.sqrt(len(u))
    assert np.array_equal(uniforms(seeds[7:9], 0), u[7:9])  # a row's draw depends on its seed and index only
    assert uniforms(seeds[:1], 1)[0] != u[0]
    tokens = uniforms(seeds[:1, None], np.arange(1000)[None])[0]  # one branch's successive tokens
    assert abs(tokens.mean() - 0.5) < 0.03 and abs(np.corrcoef(tokens[:-1], tokens[1:])[0, 1]) < 0.1


def test_records_build_breadth_first_trees():
    """A (2, 2) tree completed in a scrambled order comes out numbered level by level, children in order."""
    records = NodeRecords()
    seg = 2

    def done(parent, child, depth, code, tokens, finished=False):
        n = len(tokens)
        row = np.zeros((1, seg), dtype=np.int64)
        row[0, :n] = tokens
        b = Branches(
            tree=np.array([0]),
            parent=np.array([parent]),
            child=np.array([child]),
            depth=np.array([depth]),
            code=np.array([code]),
            path=np.array([0]),
            seed=np.zeros(1, np.uint64),
            n=np.array([n]),
            tokens=row,
            logprobs=row * -0.5,
            own_slots=np.zeros((1, seg), dtype=np.int64),
        )
        return int(records.add(b, np.array([finished]))[0])

    second = done(ROOT, 1, 1, 1, [30, 31])
    first = done(ROOT, 0, 1, 0, [10, 11])
    done(second, 0, 2, 2, [32], finished=True)
    done(first, 1, 2, 1, [13, 14])
    done(first, 0, 2, 0, [12, 15])
    done(second, 1, 2, 3, [33, 34])
    (tree,) = records.build_trees([[1, 2, 3]], [{"k": 1}])
    assert tree.parent.tolist() == [-1, 0, 0, 1, 1, 2, 2]
    assert [tree.segment(i).tolist() for i in range(7)] == [
        [1, 2, 3],
        [10, 11],
        [30, 31],
        [12, 15],
        [13, 14],
        [32],
        [33, 34],
    ]
    assert tree.finished.tolist() == [False, False, False, False, False, True, False]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert np.allclose(tree.token_logprobs[3:], tree.token_ids[3:] * -0.5) and np.isnan(tree.token_logprobs[:3]).all()
    assert tree.info == {"k": 1}


@pytest.mark.parametrize("cascade", [False, True])
def test_padding_rows_read_and_write_only_the_scratch_slot(cascade):
    """A decode step padded from 9 branches to 16 rows: the branches' rows are the unpadded step's; each padding row
    is token 0 at position 0, writes the pool's scratch slot and reads only it; only the branches' rows are returned."""
    rng = np.random.default_rng(1)
    pool = KVPool(2, 2, 4, num_pages=4096)
    scratch = pool.reserve_scratch_slot()
    assert pool.num_pages == 4095 and scratch == 4095
    paths = PathTable(12)
    paths.add(rng.integers(0, 4095, (5, 12)), rng.integers(1, 13, 5))
    branches = random_branches(rng, paths, segment=6, count=9)
    plain = decode_inputs(branches, paths, pool, HostStaging("cpu"), cascade)
    padded = decode_inputs(branches, paths, pool, HostStaging("cpu"), cascade, pad_to=16)
    assert padded.num_tokens == 16 and padded.last_rows.tolist() == list(range(9))
    assert padded.input_ids[0, 9:].tolist() == [0] * 7 and padded.position_ids[0, 9:].tolist() == [0] * 7
    assert torch.equal(padded.input_ids[:, :9], plain.input_ids)
    meta, ref = padded.meta, plain.meta
    assert meta.write_slots[9:].tolist() == [scratch] * 7 and torch.equal(meta.write_slots[:9], ref.write_slots)
    assert meta.query_key_pos[9:, 0].tolist() == [0] * 7 and meta.kv_slots[9:, 0].tolist() == [scratch] * 7
    valid = torch.arange(ref.kv_slots.shape[1])[None] <= ref.query_key_pos
    assert torch.equal(meta.kv_slots[:9, : ref.kv_slots.shape[1]][valid], ref.kv_slots[valid])
    if cascade:
        g = meta.groups
        pad_group = int(g.group_of_seq[9])
        assert g.group_of_seq[9:].tolist() == [pad_group] * 7 and pad_group == len(ref.groups.prefix_len)
        assert g.prefix_len[pad_group] == 1 and g.prefix_slots[pad_group, 0] == scratch
        assert torch.equal(g.group_of_seq[:9], ref.groups.group_of_seq)
    with pytest.raises(ValueError, match="pad_to=8 is fewer rows than the step's 9 branches"):
        decode_inputs(branches, paths, pool, HostStaging("cpu"), cascade, pad_to=8)


def test_decode_buckets():
    from treerpo.engine.step_builder import decode_bucket

    assert [decode_bucket(n) for n in (1, 2, 3, 5, 64, 65, 256, 257, 700)] == [2, 2, 4, 8, 64, 128, 256, 512, 768]
