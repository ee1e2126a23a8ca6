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
only: 4 * pairs * head_dim * heads for the forward, 3.5x that for forward+backward. Every system's output is
checked against the exact "paths" backend in fp32 (norm-relative error; a system over ``TOLERANCE`` is
reported "wrong", left out of the ratios, and the run exits 1); a system that fails is reported and skipped.
``rows_causal`` on CUDA runs SDPA pinned to its flash backend (or flash_attn/xformers; ``dense_kernel``
says which). The Triton rows carry their CUDA time by kernel (fwd, dK/dV, dQ, and the rest: "glue").
``--json`` is rewritten after every system, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table

from treerpo.attention.kernel_check import relative_error
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


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # norm-relative, against fp32
KERNEL_PARTS = {"_tree_attn_fwd": "fwd", "_tree_attn_bwd_dkdv": "dkdv", "_tree_attn_bwd_dq": "dq"}


def dense_kernel(device) -> str:
    """What ``rows_causal`` runs on: flash_attn or xformers when installed, else SDPA (pinned to its flash
    backend on CUDA)."""
    kernels = available_dense_kernels(device)
    return next(
        (k for k in ("flash_attn", "xformers") if k in kernels), "sdpa-flash" if device.type == "cuda" else "sdpa"
    )


def pinned_sdpa(device):
    """SDPA held to its flash backend on CUDA (a fallback there would make the rows baseline slower than FA2)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def kernel_split_ms(step) -> dict | None:
    """CUDA time of one forward+backward by kernel (the Triton tree kernels; everything else is "glue")."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    split = {"fwd": 0.0, "dkdv": 0.0, "dq": 0.0, "glue": 0.0}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0
        part = next((v for k, v in KERNEL_PARTS.items() if k in event.key), "glue")
        split[part] += us / 1e3
    return {f"{k}_ms": v for k, v in split.items()}


@dataclass
class Case:
    """One size's inputs: the packed trees and the same values gathered as independent rows."""

    size: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_tree: torch.Tensor
    tin: torch.Tensor
    tout: torch.Tensor
    rows: tuple  # (q, k, v, grad) of the rows, [rows, H, row_len, D]
    flat_rows: torch.Tensor
    tree_pairs: int
    row_pairs: int
    reference: torch.Tensor  # fp32 output of the trees
    scale: float


def run_size(size: int, args, device, dtype, on_result=None) -> tuple[list[dict], dict]:
    """Every system at one size. A system that raises or whose output is off the fp32 reference (norm-relative
    ``TOLERANCE``) is reported as such and the others still run; ``on_result(results)`` after each system."""
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
    # the reference: the exact "paths" backend on the same values in fp32 (memory follows the visible pairs)
    with torch.no_grad():
        reference = get_tree_backend("paths")(q.float(), k.float(), v.float(), tin, tout, scale=scale, cache={})

    systems = {}
    if device.type == "cuda" and _register_triton():
        systems["triton"] = (get_tree_backend("triton"), True)
    if "flex" in available_tree_backends():
        systems["flex"] = (get_tree_backend("flex"), device.type == "cuda")
    systems["sdpa_tree"] = (sdpa_tree_attention, True)
    systems["paths"] = (get_tree_backend("paths"), True)

    case = Case(
        size, q, k, v, grad_tree, tin, tout, (qr, kr, vr, grad_rows), flat_rows, tree_pairs, row_pairs, reference, scale
    )
    results = []
    for name in [*systems, "rows_causal"]:
        try:
            row = _run_system(name, systems.get(name), case, args)
        except Exception as exc:  # reported, and the other systems still run
            row = {"size": size, "system": name, "status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}
        results.append(row)
        if on_result:
            on_result(results)
        print(f"  {size}: {name} {row['status']}", flush=True)
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


def _run_system(name: str, system, case: Case, args) -> dict:
    """Time one system (forward, forward+backward), check its output, measure its memory and kernel split."""
    device, (hq, d) = case.q.device, (case.q.shape[1], case.q.shape[3])
    if name == "rows_causal":
        *inputs, grad = case.rows
        r, s = inputs[0].shape[0], inputs[0].shape[2]
        pairs, tokens, has_bwd = case.row_pairs, r * s, True

        kernel = {"name": dense_kernel(device)}

        def call(a, b, c):
            if kernel["name"] == "sdpa-flash":
                try:
                    with pinned_sdpa(device):
                        return causal_prefix_attention(a, b, c, case.scale)
                except RuntimeError as exc:  # flash refused these inputs: SDPA's own choice, said in the row
                    kernel["name"] = f"sdpa (flash refused: {str(exc)[:80]})"
            return causal_prefix_attention(a, b, c, case.scale)
    else:
        fn, has_bwd = system
        inputs, grad, pairs, tokens, cache = (
            (case.q, case.k, case.v),
            case.grad_tree,
            case.tree_pairs,
            case.tin.numel(),
            {},
        )

        def call(a, b, c, fn=fn, cache=cache):
            return fn(a, b, c, case.tin, case.tout, scale=case.scale, cache=cache)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = call(*inputs)
        fwd_s = measure(lambda: call(*inputs), args.repeats)
        fwd_peak = peak_bytes(lambda: call(*inputs), device)
    if name == "rows_causal":  # each row's outputs against the reference at the same tokens
        out = out.transpose(0, 1).reshape(hq, r * s, d)
        err = relative_error(out, case.reference[0][:, case.flat_rows])
    else:
        err = relative_error(out, case.reference)
    del out
    fwdbwd_s = fwdbwd_peak = split = None
    if has_bwd:
        leaves = [t.detach().requires_grad_(True) for t in inputs]

        def step():
            o = call(*leaves)
            o.backward(grad)
            for t in leaves:
                t.grad = None

        fwdbwd_s = measure(step, args.repeats)
        fwdbwd_peak = peak_bytes(step, device)
        split = kernel_split_ms(step) if name == "triton" else None
    flops = 4 * pairs * d * hq
    tol = TOLERANCE[case.q.dtype]
    return {
        "size": case.size,
        "system": name,
        "status": "ok" if err <= tol else f"wrong: relative error {err:.3g} > {tol}",
        "tokens": tokens,
        "visible_pairs": pairs,
        "fwd_ms": fwd_s * 1e3,
        "fwdbwd_ms": None if fwdbwd_s is None else fwdbwd_s * 1e3,
        "fwd_tflops": flops / fwd_s / 1e12,
        # backward: dV, dP, dS->dK and dQ products, 2.5x the forward's two: 3.5x the forward in all
        "fwdbwd_tflops": None if fwdbwd_s is None else 3.5 * flops / fwdbwd_s / 1e12,
        "fwd_peak_MiB": None if fwd_peak is None else fwd_peak / 2**20,
        "fwdbwd_peak_MiB": None if fwdbwd_peak is None else fwdbwd_peak / 2**20,
        "rel_err": err,
        "dense_kernel": kernel["name"] if name == "rows_causal" else None,
        **(split or {}),
    }


def ratios_for(results: list[dict], info: dict) -> dict:
    by = {r["system"]: r for r in results if r["status"] == "ok"}
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

    def payload(partial: list[dict] | None = None) -> dict:
        sizes_done = [str(i["size"]) for i in infos]
        return {
            "machine": machine(),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "dtype": str(dtype),
            "args": vars(args),
            "complete": partial is None and len(infos) == len(args.sizes),
            "batches": infos,
            "results": all_results + (partial or []),
            "ratios_by_size": ratios_by_size,
            "ratios": ratios_by_size[sizes_done[-1]] if sizes_done else {},
        }

    def save(partial=None):
        if args.json:
            Path(args.json).write_text(json.dumps(payload(partial), indent=1))

    for size in args.sizes:
        results, info = run_size(size, args, device, dtype, on_result=save)
        all_results += results
        infos.append(info)
        ratios_by_size[str(size)] = ratios_for(results, info)
        save()
    print()
    print_table(
        infos,
        ["size", "trees", "tree_tokens", "rows", "row_len", "row_tokens", "tree_visible_pairs", "row_visible_pairs"],
    )
    print()
    columns = ["size", "system", "status", "tokens", "fwd_ms", "fwdbwd_ms", "fwd_tflops", "fwdbwd_tflops"]
    print_table(all_results, [*columns, "fwd_peak_MiB", "fwdbwd_peak_MiB", "rel_err", "dense_kernel"])
    if any("fwd_ms" in r and r["system"] == "triton" for r in all_results):
        print("\nTriton fwd+bwd CUDA time by kernel (ms):")
        print_table(
            [r for r in all_results if r["system"] == "triton"], ["size", "fwd_ms", "dkdv_ms", "dq_ms", "glue_ms"]
        )
    ratios = ratios_by_size[str(args.sizes[-1])]
    print(
        f"\nratios at {args.sizes[-1]} tree tokens (speedup = other's ms / this one's ms; "
        "flex_over_sdpa = sdpa_tree ms / flex ms):"
    )
    for key, val in ratios.items():
        print(f"  {key}: {val:.3g}")
    if args.json:
        print(f"results written to {args.json}")
    bad = [f"{r['size']} {r['system']}: {r['status']}" for r in all_results if r["status"] != "ok"]
    if bad:
        print("systems not ok:\n  " + "\n  ".join(bad))
    return 1 if any(r["status"].startswith("wrong") for r in all_results) else 0


if __name__ == "__main__":
    sys.exit(main())
