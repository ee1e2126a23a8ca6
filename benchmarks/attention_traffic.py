"""Bytes the Triton tree attention moves through global memory for one forward and backward, before and after
grouped-query packing and the backward rework, counted from the kernels' own skip lists (analytic: no GPU).

    python benchmarks/attention_traffic.py --json t.json      # 32k tokens, Qwen2.5-1.5B's attention, bf16

Both designs visit only the tile pairs of their skip lists (``treerpo.trees.tile_skip``); what differs is who
loads what:

  before  one program per query head: every K/V tile read once per query head of its group; dK/dV written in
          fp32 per query head, summed over the group and cast in torch; delta = rowsum(dO * O) in torch (fp32
          copies); q, k, v and dO copied to contiguous buffers (a model hands over transposed views); tiles of
          64 rows for all three kernels (tile_configs before this change).
  after   one program per KV head serves its whole group (query tiles of rows x heads lanes): a K/V tile read
          once for the group; dK/dV summed in the kernel and written once in the input dtype; delta in a small
          kernel; inputs read through their strides; the tile shapes of ``tile_configs.default_tiles``.

Counted: every tile load and store a program issues (Q, K, V, dO, O, dQ, dK, dV, LSE, delta, tin/tout), and
the torch passes of the old design (each reads and writes its whole tensors). Not counted: caches (a tile
read twice may hit L2; this is the traffic the programs ask for, the upper bound the kernels must serve).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table

from treerpo.kernels.tile_configs import default_tiles
from treerpo.memory.workload import full_tree
from treerpo.tree import TreeSpec
from treerpo.trees.packing import pack_trees
from treerpo.trees.tile_skip import tile_skip

OLD_BLOCK = 64
INT = 4  # bytes of an int32 / fp32 scalar


def pairs(tin, tout, rows: int, keys: int) -> int:
    """Tile pairs of the skip list for query tiles of ``rows`` and key tiles of ``keys``."""
    return len(tile_skip(tin, tout, rows, keys)[1])


def before_bytes(n: int, hq: int, hkv: int, d: int, e: int, p64: int) -> dict[str, float]:
    """The per-query-head design, tiles of 64 both ways, ``p64`` pairs in its skip list (and its transpose)."""
    q_elems, kv_elems = hq * n * d, hkv * n * d
    tile = OLD_BLOCK * d * e
    return {
        "copies": 2 * e * (q_elems + 2 * kv_elems) + 2 * e * q_elems,  # q, k, v in the forward; dO in the backward
        "fwd": hq * (n * d * e + p64 * (2 * tile + 2 * OLD_BLOCK * INT) + n * d * e + n * INT),
        "delta": q_elems * (2 * e + 24) + hq * n * INT,  # dO.float(), O.float(), the product, its row sums
        "dkdv": hq * (2 * n * d * e + p64 * (2 * tile + 3 * OLD_BLOCK * INT) + 2 * n * d * INT),
        "dkdv_group_sum": 2 * (q_elems * INT + kv_elems * INT) + 2 * (kv_elems * INT + kv_elems * e),
        "dq": hq * (2 * n * d * e + 2 * n * INT + p64 * (2 * tile + 2 * OLD_BLOCK * INT) + n * d * e),
    }


def after_bytes(n: int, hq: int, hkv: int, d: int, e: int, tiles, p_fwd: int, p_dkdv: int, p_dq: int) -> dict:
    """The packed design with ``tiles`` (already widened for the group) and its three skip lists' pair counts."""
    group = hq // hkv
    q_elems, kv_elems = hq * n * d, hkv * n * d
    fwd, dkdv, dq = tiles.fwd, tiles.dkdv, tiles.dq
    lanes = {c: c.rows(group) * group for c in (fwd, dkdv, dq)}
    return {
        "copies": 0,
        "fwd": 2 * q_elems * e + hq * n * INT + hkv * p_fwd * (2 * fwd.block_n * d * e + 2 * fwd.block_n * INT),
        "delta": 2 * q_elems * e + hq * n * INT,
        "dkdv": hkv * p_dkdv * (2 * lanes[dkdv] * d * e + 2 * lanes[dkdv] * INT + dkdv.rows(group) * INT)
        + 2 * kv_elems * e * 2
        + hkv * n * 2 * INT,
        "dkdv_group_sum": 0,
        "dq": 3 * q_elems * e + 2 * hq * n * INT + hkv * p_dq * (2 * dq.block_n * d * e + 2 * dq.block_n * INT),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="tree tokens in the batch (about)")
    parser.add_argument("--branching", type=int, nargs="+", default=[4, 2, 2])
    parser.add_argument("--segment-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--element-bytes", type=int, default=2, help="2: bf16/fp16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    spec = TreeSpec(tuple(args.branching), args.segment_tokens)
    per_tree = args.prompt_tokens + args.segment_tokens * int(np.sum(np.cumprod(args.branching)))
    rng = np.random.default_rng(0)
    count = max(1, round(args.tokens / per_tree))
    trees = [full_tree(spec, args.prompt_tokens, rng, vocab=1000) for _ in range(count)]
    batch = pack_trees(trees)
    tin, tout, n = batch.tin, batch.tout, batch.num_tokens
    hq, hkv, d, e = args.heads, args.kv_heads, args.head_dim, args.element_bytes
    group = hq // hkv
    tiles = default_tiles(d).for_group(group)
    counts = {"before (64 x 64)": pairs(tin, tout, OLD_BLOCK, OLD_BLOCK)}
    for name, cfg in zip(("fwd", "dkdv", "dq"), tiles.as_tuple(), strict=True):
        counts[f"{name} ({cfg.rows(group)} rows x {cfg.block_n})"] = pairs(tin, tout, cfg.rows(group), cfg.block_n)
    p64, p_fwd, p_dkdv, p_dq = counts.values()
    old = before_bytes(n, hq, hkv, d, e, p64)
    new = after_bytes(n, hq, hkv, d, e, tiles, p_fwd, p_dkdv, p_dq)
    rows = [
        {"part": k, "before_MB": old[k] / 1e6, "after_MB": new[k] / 1e6, "before_over_after": old[k] / new[k]}
        if new[k]
        else {"part": k, "before_MB": old[k] / 1e6, "after_MB": 0.0, "before_over_after": None}
        for k in old
    ]
    total_old, total_new = sum(old.values()), sum(new.values())
    rows.append({"part": "total", "before_MB": total_old / 1e6, "after_MB": total_new / 1e6})
    rows[-1]["before_over_after"] = total_old / total_new
    print(
        f"tree attention traffic, one forward and backward, on {machine()} (analytic): {n} tokens, {len(trees)} trees "
        f"{args.branching} x {args.segment_tokens} tokens + {args.prompt_tokens}-token prompts; heads {hq}/{hkv}, "
        f"dim {d}, {e}-byte elements; tiles after: fwd {tiles.fwd}, dkdv {tiles.dkdv}, dq {tiles.dq}"
    )
    print("tile pairs in the skip lists: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print_table(rows, ["part", "before_MB", "after_MB", "before_over_after"])
    ratios = {"bytes_before_over_after": total_old / total_new, "fwd_bytes_before_over_after": old["fwd"] / new["fwd"]}
    ratios["bwd_bytes_before_over_after"] = sum(v for k, v in old.items() if k != "fwd") / sum(
        v for k, v in new.items() if k != "fwd"
    )
    if args.json:
        payload = {
            "machine": machine(),
            "args": vars(args),
            "tokens": n,
            "pairs": counts,
            "parts": rows,
            "ratios": ratios,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
