"""The tree attention's launch configurations: defaults, overrides, widening for grouped-query heads, and
autotuning (its choice cached per key, forced kernels left alone, the answer unchanged)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

pytest.importorskip("triton")

from helpers import random_tree
from treerpo.attention import triton_autotune, triton_backends
from treerpo.attention.sdpa_backend import sdpa_tree_attention
from treerpo.kernels import tile_configs
from treerpo.kernels.tile_configs import TileConfig, TreeTiles, default_tiles, parse_tiles
from treerpo.trees.packing import pack_trees

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_parse_tiles_and_refusals():
    assert parse_tiles("fwd=128x64w8s3, dq=64x32w4s2") == {
        "fwd": TileConfig(128, 64, 8, 3),
        "dq": TileConfig(64, 32, 4, 2),
    }
    with pytest.raises(ValueError, match="expected KERNEL=MxNwWARPSsSTAGES"):
        parse_tiles("fwd=128x64")
    with pytest.raises(ValueError, match="power of two"):
        parse_tiles("dkdv=48x64w4s2")


def test_overrides_win_and_groups_widen_the_lanes(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU defaults, not the interpreter's
    base = tile_configs.tree_tiles(128, 1)
    assert base == default_tiles(128)
    monkeypatch.setenv("TREERPO_TRITON_TILES", "fwd=64x64w4s2")
    assert tile_configs.tree_tiles(128, 1).fwd == TileConfig(64, 64, 4, 2)
    tile_configs.set_tile_override({"dq": TileConfig(32, 32, 4, 1)})
    try:
        tiles = tile_configs.tree_tiles(128, 1)
        assert tiles.dq == TileConfig(32, 32, 4, 1) and tiles.fwd == TileConfig(64, 64, 4, 2)
    finally:
        tile_configs.set_tile_override(None)
    # 20 query heads a KV head on a 16-lane dK/dV tile: widened to 32 lanes, one row a tile
    wide = tile_configs.tree_tiles(128, 20)
    assert wide.dkdv.block_m == 32 and wide.dkdv.rows(20) == 1
    assert default_tiles(128).fwd.rows(6) == 21  # 126 of 128 lanes hold whole rows of 6 heads


def test_default_warps_match_the_rows_of_the_dots():
    """One warp group (4 warps) a 64-row slab of the dots: more warps would repeat the same product."""
    for d in (64, 96, 128):
        for hopper in (True, False):
            t = default_tiles(d, hopper)
            for cfg, rows in ((t.fwd, t.fwd.block_m), (t.dq, t.dq.block_m), (t.dkdv, t.dkdv.block_n)):
                assert cfg.num_warps == 4 * max(1, rows // 64), (d, hopper, cfg)


def test_autotune_times_each_kernel_once_per_key_and_keeps_the_answer(monkeypatch):
    rng = np.random.default_rng(2)
    batch = pack_trees([random_tree(rng, 6), random_tree(rng, 4, shape="chain")])
    tin, tout = batch.tin.to(DEVICE), batch.tout.to(DEVICE)
    n = batch.tin.numel()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 16, generator=gen).to(DEVICE) for h in (4, 2, 2))
    small, wide = TileConfig(16, 16, 4, 1), TileConfig(32, 16, 4, 1)
    monkeypatch.setattr(triton_backends, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(
        triton_autotune, "candidates", lambda d, hopper: {k: [small, wide] for k in ("fwd", "dkdv", "dq")}
    )
    monkeypatch.setattr(triton_autotune, "REPEATS", 1)
    monkeypatch.setattr(triton_backends, "_TUNED", {})
    monkeypatch.setenv("TREERPO_TRITON_TILES", "dq=16x16w4s1")  # forced: not tuned
    runs = []
    timings = iter([2.0, 1.0, 1.0, 3.0])  # fwd: wide faster; dkdv: small faster (two timed runs each)
    monkeypatch.setattr(triton_autotune, "_seconds", lambda fn, device: (runs.append(fn()), next(timings))[1])
    out = triton_backends.triton_tree_backend(q, k, v, tin, tout, cache={})
    chosen = next(iter(triton_backends._TUNED.values()))
    assert chosen == TreeTiles(wide, small, TileConfig(16, 16, 4, 1)) and len(runs) == 4
    again = triton_backends.triton_tree_backend(q, k, v, tin, tout, cache={})
    assert len(runs) == 4, "the choice is cached per key"
    ref = sdpa_tree_attention(q, k, v, tin, tout)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(again, out)
