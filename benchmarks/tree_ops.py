"""Tree bookkeeping: treerpo._C (C++) against the best vectorised pure-PyTorch versions, side by side.

    python benchmarks/tree_ops.py --json tree_ops.json     # batches of 1k to 1M nodes, 10k to 10M tokens
    python benchmarks/tree_ops.py --quick                  # smoke test: the small sizes, one repeat

Three operations on the same flat batch (the arrays of every tree concatenated, as ``FlatTrees`` holds
them; building that from Tree objects is outside the timings, and the same for both sides):

- ``advantages``: node values bottom-up, sibling-group mean and std, the tau filter, group-std advantages;
- ``pack``: the packing metadata with pruning (DFS layout, positions, tin/tout, prev_index, loss mask,
  per-token advantages, tree and node index), as the trainer calls it;
- ``tile_skip``: the 64x64 tile skip list of the packed batch.

The PyTorch versions work level by level (a Python loop over tree depth, never over nodes) with scatter,
gather, cumsum and sort, with transparent huge pages on (``THP_MEM_ALLOC_ENABLE=1``, as the C++ buffers
have them); both sides' outputs are checked equal before timing. Times are medians;
``ratios`` is PyTorch time / C++ time. The C++ runs on one thread; PyTorch gets the faster of one thread
and ``torch.get_num_threads()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

# PyTorch's CPU allocator asks for transparent huge pages only when told to; the C++ buffers (like numpy's
# arrays) always do. Without them, filling fresh memory here costs one page fault per 4 KiB.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch

from treerpo.trees import native
from treerpo.trees.tile_skip import tile_skip_vectorized

# name, trees' branching, trees, mean tokens per generated segment, probability a segment ends with EOS
SIZES = [
    ("1k nodes", (8, 8, 8), 3, 10, 0.15),
    ("10k nodes", (8, 8, 8), 24, 10, 0.15),
    ("100k nodes", (8, 8, 8), 240, 10, 0.15),
    ("1M nodes", (8, 8, 8), 2400, 10, 0.15),
    ("paper trees", (8, 8, 8), 16, 384, 0.1),  # 16 prompts of 512-leaf trees of 384-token segments
]
QUICK = 2  # --quick runs the first two sizes


# ---- a random batch, already flat ----------------------------------------------------------------------
def random_batch(branching, num_trees: int, seg_tokens: int, eos: float, rng: np.random.Generator) -> dict:
    """Trees expanded level by level (an EOS segment is a shorter leaf), then each tree's nodes made contiguous."""
    tree, parent = np.arange(num_trees), np.full(num_trees, -1)
    depth, done = np.zeros(num_trees, np.int64), np.zeros(num_trees, bool)
    frontier = np.arange(num_trees)
    for level, b in enumerate(branching, start=1):
        parents = np.repeat(frontier, b)
        frontier = len(tree) + np.flatnonzero(rng.random(len(parents)) >= eos)  # the others ended with EOS
        finished = np.ones(len(parents), bool)
        finished[frontier - len(tree)] = False
        tree, parent = np.concatenate([tree, tree[parents]]), np.concatenate([parent, parents])
        depth, done = np.concatenate([depth, np.full(len(parents), level)]), np.concatenate([done, finished])
    order = np.argsort(tree, kind="stable")  # per tree, level by level: parents stay before children
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    node_offsets = np.concatenate([[0], np.cumsum(np.bincount(tree, minlength=num_trees))])
    tree, parent, depth, done = tree[order], parent[order], depth[order], done[order]
    local_parent = np.where(parent < 0, -1, rank[np.maximum(parent, 0)] - node_offsets[tree])
    lengths = np.where(done, rng.integers(1, seg_tokens + 1, len(tree)), rng.integers(1, 2 * seg_tokens, len(tree)))
    lengths[node_offsets[:-1]] = seg_tokens  # the prompts
    has_child = np.zeros(len(tree), bool)
    has_child[(local_parent + node_offsets[tree])[local_parent >= 0]] = True
    reward = np.where(has_child, np.nan, rng.integers(0, 2, len(tree)).astype(float))
    token_offsets = np.concatenate([[0], np.cumsum(lengths)])
    return dict(
        node_offsets=node_offsets.astype(np.int64),
        parent=local_parent.astype(np.int64),
        depth=depth,
        reward=reward,
        token_offsets=token_offsets.astype(np.int64),
        token_ids=rng.integers(0, 50_000, token_offsets[-1]).astype(np.int64),
    )


# ---- the vectorised PyTorch versions -------------------------------------------------------------------
def global_parents(node_offsets, parent):
    """(global parent index, with roots pointing at themselves; root mask; tree of each node)."""
    tree = torch.repeat_interleave(torch.arange(len(node_offsets) - 1), node_offsets.diff())
    base = node_offsets[:-1][tree]
    root = parent < 0
    return torch.where(root, base, parent + base), root, tree


def levels(depth):
    """Node indices grouped by depth, shallowest first."""
    return torch.split(torch.argsort(depth, stable=True), torch.bincount(depth).tolist())


def torch_advantages(node_offsets, parent, depth, reward, tau=0.1, eps=1e-6, normalization="group_std"):
    n = len(parent)
    gparent, root, _ = global_parents(node_offsets, parent)
    child = torch.nonzero(~root).squeeze(1)
    gp = gparent[child]
    num_children = torch.bincount(gp, minlength=n).double()
    inner = num_children > 0
    values = torch.where(inner, 0.0, reward)
    child_sum = torch.zeros(n, dtype=torch.float64)
    by_depth = levels(depth)
    for d in range(len(by_depth) - 1, 0, -1):  # children mean, bottom-up
        nodes = by_depth[d]
        child_sum.index_add_(0, gparent[nodes], values[nodes])
        up = by_depth[d - 1][inner[by_depth[d - 1]]]
        values[up] = child_sum[up] / num_children[up]
    v = values[child]
    mean = torch.zeros(n, dtype=torch.float64).index_add_(0, gp, v) / num_children.clamp(min=1)
    centred = v - mean[gp]
    var = torch.zeros(n, dtype=torch.float64).index_add_(0, gp, centred * centred) / (num_children - 1).clamp(min=1)
    std = var.sqrt()
    keep = ((num_children >= 2) & (std >= tau) & (std != 0))[gp]
    kept = torch.zeros(n, dtype=torch.bool)
    kept[child] = keep
    adv = torch.zeros(n, dtype=torch.float64)
    adv[child] = torch.where(keep, centred / (std[gp] + eps) if normalization == "group_std" else centred, 0.0)
    if normalization == "batch_std" and bool(keep.any()):
        adv /= centred[keep].std(correction=0) + eps
    return values, adv, kept


def torch_pack(node_offsets, parent, depth, token_offsets, token_ids, kept, advantage, prune=True):
    n = len(parent)
    gparent, root, tree = global_parents(node_offsets, parent)
    by_depth = levels(depth)
    seg_len = token_offsets.diff()
    include = kept | root if prune else torch.ones(n, dtype=torch.bool)
    for d in range(len(by_depth) - 1, 0, -1):  # a node with a kept node below it is needed
        nodes = by_depth[d][include[by_depth[d]]]
        include[gparent[nodes]] = True
    sub = torch.where(include, seg_len, 0)
    for d in range(len(by_depth) - 1, 0, -1):  # tokens in each subtree
        sub.index_add_(0, gparent[by_depth[d]], sub[by_depth[d]])
    # each child starts after its earlier siblings' subtrees: an exclusive cumsum within sibling groups
    child = torch.nonzero(~root).squeeze(1)
    siblings = child[torch.argsort(gparent[child], stable=True)]
    sizes = sub[siblings]
    before = torch.cumsum(sizes, 0) - sizes
    group_start = torch.ones_like(siblings, dtype=torch.bool)
    group_start[1:] = gparent[siblings[1:]] != gparent[siblings[:-1]]
    first = torch.nonzero(group_start).squeeze(1)
    sibling_offset = torch.zeros(n, dtype=torch.long)
    sibling_offset[siblings] = before - before[first][torch.cumsum(group_start.long(), 0) - 1]
    roots = node_offsets[:-1]
    start, position = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    start[roots] = torch.cumsum(sub[roots], 0) - sub[roots]
    last_row = torch.where(seg_len > 0, start + seg_len - 1, -1)
    for d in range(1, len(by_depth)):  # top-down
        nodes = by_depth[d]
        p = gparent[nodes]
        start[nodes] = start[p] + seg_len[p] + sibling_offset[nodes]
        position[nodes] = position[p] + seg_len[p]
        last_row[nodes] = torch.where(seg_len[nodes] > 0, start[nodes] + seg_len[nodes] - 1, last_row[p])
    placed = torch.nonzero(include & (seg_len > 0)).squeeze(1)
    dfs = placed[torch.argsort(start[placed])]
    node = torch.repeat_interleave(dfs, seg_len[dfs])
    row = torch.arange(len(node))
    within = row - start[node]
    prev = row - 1
    prev[start[dfs]] = torch.where(root[dfs], -1, last_row[gparent[dfs]])
    return dict(
        input_ids=token_ids[token_offsets[node] + within],
        position_ids=position[node] + within,
        tin=row.int(),
        tout=(start + sub)[node].int(),
        prev_index=prev,
        loss_mask=(kept & ~root)[node],
        advantages=torch.where(root, 0.0, advantage).float()[node],
        tree_index=tree[node],
        node_index=(torch.arange(n) - node_offsets[:-1][tree])[node],
    )


# ---- timing --------------------------------------------------------------------------------------------
def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def best_torch_time(fn, repeats: int, thread_counts: list[int]) -> tuple[float, int]:
    """PyTorch at its best: the fastest of its thread counts (on a busy machine one thread can win)."""
    default = torch.get_num_threads()
    try:
        timings = []
        for threads in thread_counts:
            torch.set_num_threads(threads)
            timings.append((median_time(fn, repeats), threads))
        return min(timings)
    finally:
        torch.set_num_threads(default)


def bench_size(name, branching, num_trees, seg_tokens, eos, repeats, thread_counts, rng) -> list[dict]:
    b = random_batch(branching, num_trees, seg_tokens, eos, rng)
    t = {k: torch.from_numpy(v) for k, v in b.items()}
    C = native._C
    adv = C.compute_advantages(b["node_offsets"], b["parent"], b["reward"])
    values, advantage, kept = torch_advantages(t["node_offsets"], t["parent"], t["depth"], t["reward"])
    assert torch.equal(kept, torch.from_numpy(adv["kept"]))
    torch.testing.assert_close(values, torch.from_numpy(adv["values"]), rtol=1e-12, atol=0)
    torch.testing.assert_close(advantage, torch.from_numpy(adv["advantages"]), rtol=1e-9, atol=1e-12)
    kept_np, kept_t = adv["kept"], torch.from_numpy(adv["kept"])
    adv_np, adv_t = adv["advantages"], torch.from_numpy(adv["advantages"])
    pack_args = (b["node_offsets"], b["parent"], b["token_offsets"], b["token_ids"], kept_np, adv_np, True)
    packed = C.pack(*pack_args)
    packed_t = torch_pack(t["node_offsets"], t["parent"], t["depth"], t["token_offsets"], t["token_ids"], kept_t, adv_t)
    for col, value in packed_t.items():
        assert torch.equal(value, torch.from_numpy(packed[col])), col
    tin, tout = packed["tin"], packed["tout"]
    skip, skip_t = C.tile_skip(tin, tout), tile_skip_vectorized(torch.from_numpy(tin), torch.from_numpy(tout))
    assert np.array_equal(skip[0], skip_t[0].numpy()) and np.array_equal(skip[1], skip_t[1].numpy())

    ops = {
        "advantages": (
            lambda: C.compute_advantages(b["node_offsets"], b["parent"], b["reward"]),
            lambda: torch_advantages(t["node_offsets"], t["parent"], t["depth"], t["reward"]),
        ),
        "pack": (
            lambda: C.pack(*pack_args),
            lambda: torch_pack(
                t["node_offsets"], t["parent"], t["depth"], t["token_offsets"], t["token_ids"], kept_t, adv_t
            ),
        ),
        "tile_skip": (
            lambda: C.tile_skip(tin, tout),
            lambda: tile_skip_vectorized(torch.from_numpy(tin), torch.from_numpy(tout)),
        ),
    }
    rows = []
    for op, (native_fn, torch_fn) in ops.items():
        native_s = median_time(native_fn, repeats)
        torch_s, threads = best_torch_time(torch_fn, repeats, thread_counts)
        rows.append(
            dict(
                size=name,
                op=op,
                trees=num_trees,
                nodes=len(b["parent"]),
                tokens=int(b["token_offsets"][-1]),
                packed_tokens=len(tin),
                tile_pairs=len(skip[1]),
                native_s=native_s,
                torch_s=torch_s,
                torch_threads=threads,
                ratio=torch_s / native_s,
            )
        )
        print(
            f"{name:>12} {op:>10}: {rows[-1]['nodes']:>9,} nodes {rows[-1]['tokens']:>11,} tokens   "
            f"C++ {native_s * 1e3:9.3f} ms   torch {torch_s * 1e3:9.3f} ms ({threads} thr)   "
            f"x{torch_s / native_s:6.1f}",
            flush=True,
        )
    return rows


def machine() -> dict:
    model = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    return dict(
        cpu=model,
        cores=os.cpu_count(),
        load_average=os.getloadavg()[0],
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="the two smallest sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not native.HAVE_NATIVE:
        raise SystemExit("treerpo._C is not built: pip install -e .")
    info = machine()
    thread_counts = sorted({1, info["torch_threads"]})
    print(
        f"treerpo._C (1 thread) vs vectorised PyTorch (best of {thread_counts} threads) on {info['cpu']}, "
        f"{info['cores']} cores, load {os.getloadavg()[0]:.1f}; torch {info['torch']}"
    )
    rng = np.random.default_rng(args.seed)
    sizes, repeats = (SIZES[:QUICK], 1) if args.quick else (SIZES, args.repeats)
    rows = [row for size in sizes for row in bench_size(*size, repeats, thread_counts, rng)]
    ratios = {f"{r['op']}@{r['size']}": round(r["ratio"], 2) for r in rows}
    print("slowest ratio:", min(ratios.items(), key=lambda kv: kv[1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "repeats": repeats, "results": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
