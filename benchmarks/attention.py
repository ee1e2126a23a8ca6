"""Tree attention side by side: the packed-tree backends against the same tokens as independent causal rows.

    python benchmarks/attention.py --sizes 2048 8192 --json a.json          # CPU defaults (fp32)
    python benchmarks/attention.py --sizes 2048 8192 32768 65536 --json a.json   # GPU defaults (bf16)

Batches of full trees (branching 4 2 2, segments of L tokens, prompts of P tokens), packed depth-first by
``treerpo.trees.packing.pack_trees``, as many trees as reach each ``--sizes`` total of tree tokens. Systems:
  triton        treerpo's Triton tree attention over the skip list (CUDA only)
  flex          FlexAttention with the interval mask_mod, one BlockMask per batch (compiled on CUDA,
                eager forward-only on CPU)
  sdpa_tree     PyTorch SDPA with a dense boolean mask per tree (the reference backend)
  paths         chunks of each path attending to their gathered ancestors, one batched SDPA (the default
                without Triton: cost follows the visible pairs)
  rows_causal   every root-to-leaf path as its own causal row (what a GRPO trainer computes), SDPA
                is_causal=True (flash on a GPU; flash_attn / xformers when installed)
Times are the median of ``--repeats`` runs after one warm-up (compile and BlockMask build excluded:
they are paid once per batch and shared by every layer). Useful TFLOP/s count visible query-key pairs
only: 4 * pairs * head_dim * heads for the forward, 2.5x that for forward+backward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, write_json

from treerpo.attention.optional_kernels import available_dense_kernels, causal_prefix_attention
from treerpo.attention.registry import _register_triton, available_tree_backends, get_tree_backend
from treerpo.attention.sdpa_backend import sdpa_tree_attention
from treerpo.memory.workload import full_tree
from treerpo.tree import TreeSpec
from treerpo.trees.packing import pack_trees

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_batch(size: int, branching, segment_tokens: int, prompt_tokens: int, seed: int = 0):
    """Packed trees reaching ``size`` tokens, and the token index of every root-to-leaf row [rows, row_len]."""
    rng = np.random.default_rng(seed)
    per_tree = prompt_tokens + segment_tokens * int(np.sum(np.cumprod(branching)))
    spec = TreeSpec(tuple(branching), segment_tokens)
    trees = [full_tree(spec, prompt_tokens, rng, vocab=1000) for _ in range(max(1, round(size / per_tree)))]
    batch = pack_trees(trees)
    tin, tout = batch.tin.long(), batch.tout.long()
    leaf_last = torch.nonzero(tout - tin == 1).flatten()  # tokens whose subtree is themselves: a leaf's last token
    row_len = prompt_tokens + segment_tokens * len(branching)
    rows = torch.empty(len(leaf_last), row_len, dtype=torch.long)
    for tree_start, tree_end in _tree_spans(tin, tout):
        t_in, t_out = tin[tree_start:tree_end], tout[tree_start:tree_end]
        for i in torch.nonzero((leaf_last >= tree_start) & (leaf_last < tree_end)).flatten().tolist():
            q = tin[leaf_last[i]]
            rows[i] = tree_start + torch.nonzero((t_in <= q) & (q < t_out)).flatten()  # ancestors, in order
    return batch, rows


def _tree_spans(tin, tout):
    start, n, base = 0, len(tin), int(tin[0])
    while start < n:
        end = int(tout[start]) - base
        yield start, end
        start = end


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn, device) -> int | None:
    """Peak memory above what was allocated before (CUDA); None on CPU (no allocator statistics for torch there)."""
    if device.type != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


def run_size(size: int, args, device, dtype) -> tuple[list[dict], dict]:
    batch, rows = build_batch(size, args.branching, args.segment_tokens, args.prompt_tokens, args.seed)
    n, (r, s) = batch.num_tokens, rows.shape
    tin, tout = batch.tin.to(device), batch.tout.to(device)
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    q, k, v = (torch.randn(1, h, n, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    grad_tree = torch.randn(1, hq, n, d, generator=g).to(device, dtype)
    flat_rows = rows.flatten().to(device)
    # rows: the same q/k/v values gathered along every root-to-leaf path
    qr, kr, vr = (t[0][:, flat_rows].view(t.shape[1], r, s, d).transpose(0, 1).contiguous() for t in (q, k, v))
    grad_rows = grad_tree[0][:, flat_rows].view(hq, r, s, d).transpose(0, 1).contiguous()
    tree_pairs = int((batch.position_ids.long() + 1).sum())  # each token sees its depth + 1 ancestors-or-self
    row_pairs = r * s * (s + 1) // 2

    systems = {}
    if device.type == "cuda" and _register_triton():
        systems["triton"] = (get_tree_backend("triton"), True)
    if "flex" in available_tree_backends():
        systems["flex"] = (get_tree_backend("flex"), device.type == "cuda")
    systems["sdpa_tree"] = (sdpa_tree_attention, True)
    systems["paths"] = (get_tree_backend("paths"), True)

    results, reference = [], None
    for name in [*systems, "rows_causal"]:
        if name == "rows_causal":
            inputs, grad, pairs, tokens, has_bwd = (qr, kr, vr), grad_rows, row_pairs, r * s, True

            def call(a, b, c):
                return causal_prefix_attention(a, b, c, scale)
        else:
            fn, has_bwd = systems[name]
            inputs, grad, pairs, tokens, cache = (q, k, v), grad_tree, tree_pairs, n, {}

            def call(a, b, c, fn=fn, cache=cache):
                return fn(a, b, c, tin, tout, scale=scale, cache=cache)

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call(*inputs)
            fwd_s = measure(lambda: call(*inputs), args.repeats)
            fwd_peak = peak_bytes(lambda: call(*inputs), device)
        if name == "rows_causal":  # compare each row's outputs with the tree outputs at the same tokens
            out = out.transpose(0, 1).reshape(hq, r * s, d)
            err = (out.float() - reference[0][:, flat_rows].float()).abs().max().item()
        elif reference is None:
            reference, err = out, 0.0
            if name != "sdpa_tree":
                reference = sdpa_tree_attention(q, k, v, tin, tout, scale=scale)
                err = (out.float() - reference.float()).abs().max().item()
        else:
            err = (out.float() - reference.float()).abs().max().item()
        del out
        fwdbwd_s = fwdbwd_peak = None
        if has_bwd:
            leaves = [t.detach().requires_grad_(True) for t in inputs]

            def step():
                o = call(*leaves)
                o.backward(grad)
                for t in leaves:
                    t.grad = None

            fwdbwd_s = measure(step, args.repeats)
            fwdbwd_peak = peak_bytes(step, device)
        flops = 4 * pairs * d * hq
        results.append(
            {
                "size": size,
                "system": name,
                "tokens": tokens,
                "visible_pairs": pairs,
                "fwd_ms": fwd_s * 1e3,
                "fwdbwd_ms": None if fwdbwd_s is None else fwdbwd_s * 1e3,
                "fwd_tflops": flops / fwd_s / 1e12,
                "fwdbwd_tflops": None if fwdbwd_s is None else 2.5 * flops / fwdbwd_s / 1e12,
                "fwd_peak_MiB": None if fwd_peak is None else fwd_peak / 2**20,
                "fwdbwd_peak_MiB": None if fwdbwd_peak is None else fwdbwd_peak / 2**20,
                "max_abs_err": err,
            }
        )
        print(f"  {size}: {name} done", flush=True)
    info = {
        "size": size,
        "tree_tokens": n,
        "trees": len(set(batch.tree_index.tolist())),
        "rows": r,
        "row_len": s,
        "row_tokens": r * s,
        "tree_visible_pairs": tree_pairs,
        "row_visible_pairs": row_pairs,
    }
    return results, info


def ratios_for(results: list[dict], info: dict) -> dict:
    by = {r["system"]: r for r in results}
    out = {"row_tokens_over_tree_tokens": info["row_tokens"] / info["tree_tokens"]}

    def ratio(key, num, den, field):
        if num in by and den in by and by[num].get(field) and by[den].get(field):
            out[key] = by[num][field] / by[den][field]

    ratio("sdpa_tree_fwd_speedup_vs_independent_rows", "rows_causal", "sdpa_tree", "fwd_ms")
    ratio("sdpa_tree_fwdbwd_speedup_vs_independent_rows", "rows_causal", "sdpa_tree", "fwdbwd_ms")
    ratio("flex_over_sdpa_fwd", "sdpa_tree", "flex", "fwd_ms")  # > 1: flex faster
    ratio("flex_over_sdpa_fwdbwd", "sdpa_tree", "flex", "fwdbwd_ms")
    ratio("flex_fwd_speedup_vs_independent_rows", "rows_causal", "flex", "fwd_ms")
    ratio("paths_fwd_speedup_vs_sdpa_tree", "sdpa_tree", "paths", "fwd_ms")
    ratio("paths_fwdbwd_speedup_vs_sdpa_tree", "sdpa_tree", "paths", "fwdbwd_ms")
    ratio("paths_fwdbwd_speedup_vs_independent_rows", "rows_causal", "paths", "fwdbwd_ms")
    ratio("triton_fwd_speedup_vs_flex", "flex", "triton", "fwd_ms")
    ratio("triton_fwdbwd_speedup_vs_flex", "flex", "triton", "fwdbwd_ms")
    ratio("triton_fwd_speedup_vs_sdpa_tree", "sdpa_tree", "triton", "fwd_ms")
    ratio("triton_fwd_speedup_vs_independent_rows", "rows_causal", "triton", "fwd_ms")
    ratio("triton_fwdbwd_speedup_vs_independent_rows", "rows_causal", "triton", "fwdbwd_ms")
    ratio("triton_useful_tflops_fraction_of_flash_rows", "triton", "rows_causal", "fwdbwd_tflops")
    return out


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="tree tokens per batch (default: 2048 8192 on CPU, 2048 8192 32768 65536 on CUDA)",
    )
    parser.add_argument("--branching", type=int, nargs="+", default=[4, 2, 2])
    parser.add_argument("--segment-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median kept); default 5 CUDA, 2 CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="toy sizes, for tests")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [512]
        args.segment_tokens, args.prompt_tokens, args.heads, args.kv_heads, args.head_dim = 8, 16, 4, 2, 32
        args.repeats = args.repeats or 1
    args.sizes = args.sizes or ([2048, 8192, 32768, 65536] if cuda else [2048, 8192])
    args.repeats = args.repeats or (5 if cuda else 2)
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(args.seed)
    print(
        f"attention benchmark on {machine()}; {dtype}, heads {args.heads}/{args.kv_heads} kv, head dim "
        f"{args.head_dim}; trees {args.branching} x {args.segment_tokens} tokens, prompts {args.prompt_tokens} "
        f"tokens; dense kernels on {device.type}: {available_dense_kernels(device)}; median of {args.repeats}",
        flush=True,
    )
    all_results, infos, ratios_by_size = [], [], {}
    for size in args.sizes:
        results, info = run_size(size, args, device, dtype)
        all_results += results
        infos.append(info)
        ratios_by_size[str(size)] = ratios_for(results, info)
    print()
    print_table(
        infos,
        ["size", "trees", "tree_tokens", "rows", "row_len", "row_tokens", "tree_visible_pairs", "row_visible_pairs"],
    )
    print()
    print_table(
        all_results,
        [
            "size",
            "system",
            "tokens",
            "fwd_ms",
            "fwdbwd_ms",
            "fwd_tflops",
            "fwdbwd_tflops",
            "fwd_peak_MiB",
            "fwdbwd_peak_MiB",
            "max_abs_err",
        ],
    )
    ratios = ratios_by_size[str(args.sizes[-1])]
    print(
        f"\nratios at {args.sizes[-1]} tree tokens (speedup = other's ms / this one's ms; "
        "flex_over_sdpa = sdpa_tree ms / flex ms):"
    )
    for key, val in ratios.items():
        print(f"  {key}: {val:.3g}")
    write_json(
        args.json,
        {
            "machine": machine(),
            "device": device.type,
            "dtype": str(dtype),
            "args": vars(args),
            "batches": infos,
            "results": all_results,
            "ratios_by_size": ratios_by_size,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
