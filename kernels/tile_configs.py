"""Launch configurations of the tree attention kernels: tile shapes, warps and pipeline stages.

A query tile is ``block_m`` *lanes*: ``block_m // group`` rows times the ``group`` query heads of one KV
head (grouped-query packing), so a K/V tile is loaded once for the whole group. A key tile is ``block_n``
rows. The forward, the dK/dV and the dQ kernels each have their own ``TileConfig``; each distinct
(rows, ``block_n``) pair needs its own skip list, which the caller computes once per batch.

Why these numbers (Hopper, sm_90, bf16/fp16; ``tests/test_kernel_compile.py`` compiles every production
launch for sm_90 and sm_80 and asserts no spill, shared memory within the target's limit and ``warp_group_dot``):

* warps matched to the rows of a kernel's dots (query lanes in the forward and dQ, key rows in dK/dV):
  ``num_warps = 4 * (rows // 64)``. One warp group (4 warps) issues a 64-row ``wgmma``; a second warp
  group on a 64-row tile would compute the same QK^T and softmax again.
* forward and dQ: 128 lanes x 64 keys, 8 warps, 3 stages (203 and 201 registers at head dim 128, no spill).
  128 lanes, not 64: with 6 heads a KV head a 64-lane tile holds 10 rows, and every K/V tile is then read
  for every 10 query rows (``benchmarks/attention_traffic.py``: dQ moved more bytes packed than unpacked).
* Ampere (sm_80), head dims 65-128: the forward and dQ on 32-key tiles (64 bytes a thread spilled on 64).
* dK/dV: 128 key rows, 8 warps, 3 stages, and a short query tile streamed past them: 32 lanes up to head
  dim 64, 16 lanes up to 128 (FlashAttention-2's shape for this kernel). Two fp32 accumulators of
  [keys, head dim] leave no room for more: 64 keys x 64 lanes on 4 warps spills 392 bytes a thread at head
  dim 128, 32 lanes on 128 keys spills 8 to 40.
* every load's mask is constant along the head dim when the head dim fills its block (``head_dim_mask``),
  so loads vectorise and pipeline into shared memory (asynchronous copies); a column mask there made them
  scalar and spilled every backward configuration.

Overrides: ``TREERPO_TRITON_TILES="fwd=128x64w8s3,dkdv=64x64w4s2,dq=64x64w4s2"`` (any subset) or
``set_tile_override``; ``TREERPO_TRITON_AUTOTUNE=1`` times ``candidates`` on the first batch of each
(kernel, head dim, dtype, group, length bucket) key on a GPU and caches the fastest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

import torch

from ._common import interpreting

__all__ = ["TileConfig", "TreeTiles", "tree_tiles", "candidates", "parse_tiles", "set_tile_override", "length_bucket"]

KERNELS = ("fwd", "dkdv", "dq")


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query lanes (rows x grouped heads) a tile
    block_n: int  # key rows a tile
    num_warps: int
    num_stages: int

    def rows(self, group: int) -> int:
        """Query rows a tile: the lanes that hold whole rows of ``group`` heads."""
        return max(1, self.block_m // group)

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}"


@dataclass(frozen=True)
class TreeTiles:
    fwd: TileConfig
    dkdv: TileConfig
    dq: TileConfig

    def as_tuple(self) -> tuple[TileConfig, TileConfig, TileConfig]:
        return self.fwd, self.dkdv, self.dq

    def for_group(self, group: int) -> TreeTiles:
        """Lanes widened to at least ``group`` (one whole row a tile) and a power of two."""

        def fit(c: TileConfig) -> TileConfig:
            lanes = max(c.block_m, 1 << (max(1, group) - 1).bit_length())
            return c if lanes == c.block_m else replace(c, block_m=lanes)

        return TreeTiles(fit(self.fwd), fit(self.dkdv), fit(self.dq))


_INTERPRETER = TileConfig(16, 16, 1, 1)
_override: dict[str, TileConfig] = {}


def hopper_class(device: torch.device | None) -> bool:
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return True  # the production target
    return torch.cuda.get_device_capability(device)[0] in (9, 10)  # H100/H200, B200: 227 KB of shared memory


def default_tiles(head_dim: int, hopper: bool = True) -> TreeTiles:
    """The configuration a GPU gets without tuning (see the module's notes)."""
    if head_dim <= 64:
        stages = 3 if hopper else 2
        return TreeTiles(TileConfig(128, 64, 8, stages), TileConfig(32, 128, 8, stages), TileConfig(128, 64, 8, stages))
    if head_dim <= 128:
        if hopper:
            return TreeTiles(TileConfig(128, 64, 8, 3), TileConfig(16, 128, 8, 3), TileConfig(128, 64, 8, 3))
        # Ampere's mma keeps more of the tile in registers than wgmma: half the key tile of the two
        # one-accumulator kernels
        return TreeTiles(TileConfig(128, 32, 8, 2), TileConfig(16, 128, 8, 3), TileConfig(128, 32, 8, 2))
    return TreeTiles(TileConfig(64, 32, 4, 2), TileConfig(16, 64, 4, 2), TileConfig(64, 32, 4, 1))


def candidates(head_dim: int, hopper: bool = True) -> dict[str, list[TileConfig]]:
    """The small sets autotuning times, per kernel: the default first."""
    base = default_tiles(head_dim, hopper)
    if interpreting():
        return {k: [_INTERPRETER] for k in KERNELS}
    if head_dim > 128:
        return {k: [getattr(base, k)] for k in KERNELS}
    return {
        "fwd": [base.fwd, TileConfig(64, 64, 4, 3), TileConfig(128, 32, 8, 3), TileConfig(128, 64, 8, 2)],
        "dkdv": [base.dkdv, TileConfig(32, 64, 8, 2), TileConfig(16, 64, 4, 3), TileConfig(32, 128, 8, 3)],
        "dq": [base.dq, TileConfig(64, 64, 4, 2), TileConfig(128, 32, 8, 2), TileConfig(128, 64, 8, 2)],
    }


def parse_tiles(text: str) -> dict[str, TileConfig]:
    """``"fwd=128x64w8s3,dq=64x64w4s2"`` -> {kernel: TileConfig}; refuses anything else with the format."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(fwd|dkdv|dq)=(\d+)x(\d+)w(\d+)s(\d+)", part)
        if not m:
            raise ValueError(
                f"bad tile setting {part!r} in TREERPO_TRITON_TILES: expected KERNEL=MxNwWARPSsSTAGES with KERNEL "
                "one of fwd, dkdv, dq, e.g. fwd=128x64w8s3"
            )
        block_m, block_n, warps, stages = (int(g) for g in m.groups()[1:])
        for name, v in (("lanes", block_m), ("key rows", block_n), ("warps", warps)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"tile setting {part!r}: {name} must be a power of two")
        out[m.group(1)] = TileConfig(block_m, block_n, warps, max(1, stages))
    return out


def set_tile_override(tiles: dict[str, TileConfig] | None) -> None:
    """Force configurations (``{kernel: TileConfig}``) over the defaults and autotuning; None clears."""
    _override.clear()
    _override.update(tiles or {})


def overrides() -> dict[str, TileConfig]:
    env = os.environ.get("TREERPO_TRITON_TILES", "")
    return {**(parse_tiles(env) if env else {}), **_override}


def tree_tiles(head_dim: int, group: int, device: torch.device | None = None) -> TreeTiles:
    """The configuration a call gets: interpreter tiles under ``TRITON_INTERPRET=1``, else the defaults of the
    device's class; overrides on top; lanes widened to hold a whole row of ``group`` heads."""
    base = (
        TreeTiles(_INTERPRETER, _INTERPRETER, _INTERPRETER)
        if interpreting()
        else default_tiles(head_dim, hopper_class(device))
    )
    return replace(base, **overrides()).for_group(group)


def autotune_enabled(device: torch.device) -> bool:
    return os.environ.get("TREERPO_TRITON_AUTOTUNE", "0") == "1" and device.type == "cuda"


def length_bucket(n: int) -> int:
    """Packed lengths bucketed by powers of two from 1,024 (the key of a tuned choice)."""
    return max(1024, 1 << (max(1, n) - 1).bit_length())
