"""Rollout throughput: treerpo's engine against independent sampling, side by side in one run.

    python benchmarks/rollout.py --model smollm2 --prompts 8 --branching 2 2 2 --segment-tokens 32 --json r.json

Systems, on the same prompts, tree shape and number of leaves:
  (a) engine        treerpo's TreeSampler (radix-shared prompt, children fork from the parent's KV)
  (b) engine_noshare the same engine with prefix sharing off: every leaf an independent chain of segments
  (c) hf_generate   Hugging Face generate with num_return_sequences = leaves (how TRL samples without vLLM)
and, for plain sampling (depth-1 trees, nothing to share), the engine against generate.
Full segments are generated (EOS ignored) so every system produces the tokens the shape asks for.

Each system's useful FLOP rate is also set against this machine's matmul limit: useful tokens (the
generated tokens, all kept here, plus every distinct prompt's tokens once) x 2 x (non-embedding parameters
+ the LM head) / seconds, over the FLOP/s of the model's own layer matmuls (hidden -> 2 x intermediate,
intermediate -> hidden, hidden -> hidden) at a row count equal to the widest decode batch (prompts x leaves),
in the model's dtype, best of a few repeats (``matmul_limit_fraction``). Decode is memory-bound, so that
limit is far below the chip's large-matrix peak; it is the ceiling of the matmuls decoding actually runs.

    python benchmarks/rollout.py --model random-qwen2-1.5b --prompts 8 --branching 4 2 2 --json r.json   # a GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, timed, write_json

from treerpo.attention import enable_tree_attention
from treerpo.engine.tree_sampler import TreeSampler
from treerpo.models.tiny import load_model_and_tokenizer
from treerpo.sampling.generation import left_pad
from treerpo.tree import TreeSpec

PROMPTS = [
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether?\nAnswer:",
    "Question: Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of babysitting. "
    "How much did she earn?\nAnswer:",
    "Question: A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?\nAnswer:",
    "Question: James writes a 3-page letter to 2 different friends twice a week. How many pages a year?\nAnswer:",
]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    if name == "smollm2":
        from treerpo.models.smollm2 import smollm2_dir

        name = smollm2_dir()
    elif name == "random-qwen2-1.5b":  # Qwen2-1.5B-shaped, random weights, made once locally (nothing downloaded)
        from e2e_random_model import random_qwen2_dir

        name = str(random_qwen2_dir())
    model, tok = load_model_and_tokenizer(None if name == "tiny" else name, dtype=dtype)
    return enable_tree_attention(model.to(device)).eval(), tok


def flops_per_token(model) -> dict:
    """2 x (non-embedding parameters + the LM head): the forward FLOPs of one token in its matmuls (the input
    embedding is a lookup; attention's score FLOPs are left out). Tied weights count once as the head."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    skip = {embed.data_ptr(), head.data_ptr()}
    body = sum(p.numel() for p in model.parameters() if p.data_ptr() not in skip)
    return {"non_embedding_params": body, "lm_head_params": head.numel(), "flops_per_token": 2 * (body + head.numel())}


def matmul_limit(config, dtype: torch.dtype, device, rows: int, repeats: int = 5, budget_bytes: int = 1 << 30) -> dict:
    """FLOP/s of the model's decode-shaped layer matmuls: ``rows`` x hidden against hidden -> 2 x intermediate
    (gate and up), intermediate -> hidden (down) and hidden -> hidden (attention output), one weight set per
    layer (as many as fit ``budget_bytes``, so that the weights stream from memory as in decoding, not from
    cache), random inputs; the fastest of ``repeats`` timed sweeps after a warm-up."""
    device = torch.device(device)
    h = config.hidden_size
    i = getattr(config, "intermediate_size", None) or 4 * h
    shapes = [(h, 2 * i), (i, h), (h, h)]
    set_bytes = sum(a * b for a, b in shapes) * torch.tensor([], dtype=dtype).element_size()
    sets = max(1, min(config.num_hidden_layers, budget_bytes // set_bytes))
    gen = torch.Generator(device=device).manual_seed(0)  # drawn where they are used: no host copy of ~1 GiB

    def draw(a: int, b: int, scale: float = 1.0):
        return (torch.randn(a, b, generator=gen, device=device) * scale).to(dtype)

    weights = [[draw(a, b, a**-0.5) for a, b in shapes] for _ in range(sets)]
    inputs = [draw(rows, a) for a, _ in shapes]
    outputs = [torch.empty(rows, b, device=device, dtype=dtype) for _, b in shapes]
    flops_per_sweep = 2 * rows * sum(a * b for a, b in shapes) * sets

    def sweep(n: int):
        for _ in range(n):
            for ws in weights:
                for x, w, y in zip(inputs, ws, outputs, strict=True):
                    torch.mm(x, w, out=y)

    sweep(2)  # warm-up (kernel selection, first-touch of the outputs)
    once = min(timed(lambda: sweep(1))[1] for _ in range(3))
    inner = max(1, min(1000, round((0.02 if device.type == "cuda" else 0.05) / max(once, 1e-9))))
    best = min(timed(lambda: sweep(inner))[1] for _ in range(repeats))
    return {
        "rows": rows,
        "hidden": h,
        "intermediate": i,
        "weight_sets": sets,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "sweeps_per_repeat": inner,
        "repeats": repeats,
        "seconds": best / inner,
        "flop_per_s": flops_per_sweep * inner / best,
    }


def run_engine(model, tok, prompts, spec, share: bool, pool_tokens: int, cascade: bool = True, sampler=None):
    sampler = sampler or TreeSampler(
        model, tok, pool_tokens=pool_tokens, share_prefixes=share, ignore_eos=True, cascade=cascade
    )
    sampler.runner.forward_tokens = 0
    if share:
        trees, seconds = timed(lambda: sampler.sample(prompts, spec, seeds=range(len(prompts))))
    else:  # the same leaves, each an independent chain: G copies of the prompt, branching 1 at every level
        chain = TreeSpec((1,) * spec.depth, spec.segment_tokens, spec.max_prompt_tokens, spec.temperature)
        repeated = [p for p in prompts for _ in range(spec.max_leaves)]
        trees, seconds = timed(lambda: sampler.sample(repeated, chain, seeds=range(len(repeated))))
    return {
        "generated_tokens": sum(t.generated_tokens for t in trees),
        "forward_tokens": sampler.runner.forward_tokens,
        "kv_peak_bytes": sampler.pool.peak_used_bytes,
        "seconds": seconds,
        "leaves": sum(len(t.leaves()) for t in trees),
    }


@torch.no_grad()
def run_generate(model, tok, prompts, leaves: int, new_tokens: int):
    ids, mask = left_pad(prompts, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, "cpu")
    ids, mask = ids.to(model.device), mask.to(model.device)
    out, seconds = timed(
        lambda: model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            num_return_sequences=leaves,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )
    )
    rows = out.shape[0]
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    bytes_per_token = 2 * layers * heads * head_dim * model.dtype.itemsize
    return {
        "generated_tokens": rows * new_tokens,
        "forward_tokens": int(mask.sum()) * leaves + rows * new_tokens,
        "kv_peak_bytes": rows * out.shape[1] * bytes_per_token,
        "seconds": seconds,
        "leaves": rows,
    }


def greedy_tokens(model, tok, prompts, new_tokens: int, pool_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation through the engine (a depth-1 tree of one leaf)."""
    sampler = TreeSampler(model, tok, pool_tokens=pool_tokens, ignore_eos=True)
    trees = sampler.sample(prompts, TreeSpec((1,), new_tokens, max_prompt_tokens=256, temperature=0.0))
    return [t.path_token_ids(int(t.leaves()[0]), include_prompt=False).tolist() for t in trees]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far two sets of greedy continuations agree: identical ones, and the mean share of tokens before the
    first difference."""
    pairs = list(zip(a, b, strict=True))
    common = [next((i for i, (x, y) in enumerate(zip(s, t, strict=True)) if x != y), len(s)) for s, t in pairs]
    share = sum(c / max(len(s), 1) for c, (s, _) in zip(common, pairs, strict=True)) / len(pairs)
    return {"identical": sum(s == t for s, t in pairs), "of": len(pairs), "mean_prefix_share": share}


def compare_dtypes(args, model, prompts, spec: TreeSpec, systems: dict, cascade: bool) -> dict:
    """engine_tree and hf_generate with the model in --dtype and in --against-dtype, runs alternating between the
    two (the fastest of --repeats kept each), and greedy decodes of the two compared token by token."""
    other, tok = load(args.model, DTYPES[args.against_dtype], str(model.device))
    name, against = str(model.dtype).replace("torch.", ""), args.against_dtype
    runs = {name: [], against: []}
    generate = {name: [], against: []}
    for _ in range(args.repeats):
        for label, m in ((against, other), (name, model)):
            runs[label].append(run_engine(m, tok, prompts, spec, True, args.pool_tokens, cascade)["seconds"])
            generate[label].append(run_generate(m, tok, prompts, spec.max_leaves, spec.max_new_tokens)["seconds"])
    new_tokens = spec.max_new_tokens
    greedy = agreement(
        greedy_tokens(model, tok, prompts, new_tokens, args.pool_tokens),
        greedy_tokens(other, tok, prompts, new_tokens, args.pool_tokens),
    )
    best = {label: min(v) for label, v in runs.items()}
    best_generate = {label: min(v) for label, v in generate.items()}
    print(
        f"dtype comparison (runs alternating): engine_tree {name} {best[name]:.2f} s, {against} {best[against]:.2f} s; "
        f"hf_generate {name} {best_generate[name]:.2f} s, {against} {best_generate[against]:.2f} s; greedy "
        f"decodes of {new_tokens} tokens identical in {greedy['identical']} of {greedy['of']} prompts, "
        f"{greedy['mean_prefix_share']:.2f} of tokens before the first difference on average"
    )
    return {
        "engine_tree_seconds": runs,
        "hf_generate_seconds": generate,
        "greedy_agreement": greedy,
        "ratios": {
            f"engine_tree_{name}_speedup_vs_{against}": best[against] / best[name],
            f"hf_generate_{name}_speedup_vs_{against}": best_generate[against] / best_generate[name],
            "greedy_identical_share": greedy["identical"] / greedy["of"],
        },
    }


def compare_compiled(args, model, tok, prompts, spec: TreeSpec, cascade: bool) -> dict:
    """engine_tree with compiled decoder layers against eager on the same model, runs alternating (after the compiled
    sampler's first rollout, which compiles and is timed apart), graphs compiled over every run, and greedy decodes
    of the two compared token by token."""
    from treerpo.engine.compiled_layers import compile_seconds, recompiles

    def sampler(compiled: bool):
        return TreeSampler(model, tok, pool_tokens=args.pool_tokens, ignore_eos=True, cascade=cascade, compile=compiled)

    eager_sampler, compiled_sampler = sampler(False), sampler(True)
    graphs_before, seconds_before = recompiles(), compile_seconds()
    first = run_engine(model, tok, prompts, spec, True, args.pool_tokens, cascade, compiled_sampler)["seconds"]
    runs = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for label, s in (("eager", eager_sampler), ("compiled", compiled_sampler)):
            runs[label].append(run_engine(model, tok, prompts, spec, True, args.pool_tokens, cascade, s)["seconds"])
    graphs = recompiles() - graphs_before
    flat = TreeSpec((1,), spec.max_new_tokens, max_prompt_tokens=256, temperature=0.0)
    greedy = {
        label: [t.path_token_ids(int(t.leaves()[0]), include_prompt=False).tolist() for t in s.sample(prompts, flat)]
        for label, s in (("eager", eager_sampler), ("compiled", compiled_sampler))
    }
    agree = agreement(greedy["eager"], greedy["compiled"])
    failed = compiled_sampler.runner.compiled.failed
    best = {label: min(v) for label, v in runs.items()}
    print(
        f"compiled decoder layers: first rollout (compiling, {compile_seconds() - seconds_before:.1f} s of it) "
        f"{first:.1f} s; then engine_tree eager "
        f"{best['eager']:.2f} s, compiled {best['compiled']:.2f} s; {graphs} graphs compiled over every run; greedy "
        f"decodes identical in {agree['identical']} of {agree['of']}" + (f"; FELL BACK: {failed}" if failed else "")
    )
    return {
        "first_rollout_seconds": first,
        "engine_tree_seconds": runs,
        "graphs": graphs,
        "greedy_agreement": agree,
        "failed": failed,
        "ratios": {
            "compiled_speedup_vs_eager": best["eager"] / best["compiled"],
            "compile_seconds": compile_seconds() - seconds_before,
            "compiled_graphs": graphs,
            "compiled_greedy_identical_share": agree["identical"] / agree["of"],
        },
    }


def analytic_ratio(spec: TreeSpec) -> float:
    """Generated tokens of independent leaves over those of the tree: G*d*L / L*(b1 + b1 b2 + ...)."""
    return spec.max_leaves * spec.depth * spec.segment_tokens / spec.max_generated_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="smollm2",
        help="smollm2, tiny, random-qwen2-1.5b (Qwen2-1.5B-shaped, random weights), or a local model folder",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--matmul-repeats", type=int, default=5, help="timed sweeps of the matmul limit (best kept)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--branching", type=int, nargs="+", default=[2, 2, 2])
    parser.add_argument("--segment-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per system (the fastest is kept)")
    parser.add_argument("--pool-tokens", type=int, default=1 << 15)
    parser.add_argument(
        "--cascade",
        choices=["on", "off"],
        default="on",
        help="engine decode reads the prefix siblings share once per group (on) or per branch (off)",
    )
    parser.add_argument(
        "--against-dtype",
        choices=sorted(DTYPES),
        default=None,
        help="also time engine_tree and hf_generate with the model in this dtype, alternating runs with --dtype's, "
        "and compare greedy decodes of the two (e.g. --dtype bf16 --against-dtype fp32)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time engine_tree with compiled decoder layers (TreeSampler(compile=True)) against eager, "
        "alternating runs, with its compile time, graphs and greedy decodes against eager's",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    model, tok = load(args.model, dtype, device)
    texts = (PROMPTS * args.prompts)[: args.prompts]
    if args.model == "tiny":
        texts = [f"{i + 1}+{i + 2}-3=" for i in range(args.prompts)]
    prompts = [tok(t)["input_ids"] for t in texts]
    spec = TreeSpec(tuple(args.branching), args.segment_tokens, max_prompt_tokens=256)
    flat = TreeSpec((spec.max_leaves,), spec.depth * spec.segment_tokens, max_prompt_tokens=256)
    prompt_tokens = sum(len(p) for p in prompts)
    counts = flops_per_token(model)
    print(
        f"rollout benchmark on {machine()}, device {device}; model {args.model} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {counts['non_embedding_params'] / 1e6:.1f}M "
        f"non-embedding + {counts['lm_head_params'] / 1e6:.1f}M LM head, {model.dtype}); {len(prompts)} prompts "
        f"({prompt_tokens} tokens); tree {list(spec.branching)} x {spec.segment_tokens} tokens = {spec.max_leaves} "
        f"leaves of {spec.max_new_tokens} tokens"
    )
    print(
        "compared: engine_tree (the tree, shared prefixes), engine_noshare (each leaf an independent chain), "
        "hf_generate (generate, num_return_sequences = leaves), engine_flat (depth-1 trees of the same leaves)"
    )

    def best(fn):
        runs = [fn() for _ in range(args.repeats)]
        return min(runs, key=lambda r: r["seconds"])

    cascade = args.cascade == "on"
    systems = {
        "engine_tree": best(lambda: run_engine(model, tok, prompts, spec, True, args.pool_tokens, cascade)),
        "engine_noshare": best(lambda: run_engine(model, tok, prompts, spec, False, args.pool_tokens, cascade)),
        "hf_generate": best(lambda: run_generate(model, tok, prompts, spec.max_leaves, spec.max_new_tokens)),
        "engine_flat": best(lambda: run_engine(model, tok, prompts, flat, True, args.pool_tokens, cascade)),
    }
    # measured after the systems (the model's memory is in use, as during decoding) and once more; the faster kept,
    # so that a passing disturbance of the machine does not lower the limit
    limit = max(
        (
            matmul_limit(
                model.config, model.dtype, device, rows=len(prompts) * spec.max_leaves, repeats=args.matmul_repeats
            )
            for _ in range(2)
        ),
        key=lambda m: m["flop_per_s"],
    )
    print(
        f"matmul limit: {limit['flop_per_s'] / 1e12:.4g} TFLOP/s ({limit['rows']} rows x hidden {limit['hidden']} "
        f"against {limit['hidden']}->{2 * limit['intermediate']}, {limit['intermediate']}->{limit['hidden']}, "
        f"{limit['hidden']}->{limit['hidden']}, {limit['weight_sets']} weight sets, {limit['dtype']}, best of "
        f"{limit['repeats']} x 2)"
    )
    rows = []
    for name, r in systems.items():
        r["tokens_per_s"] = r["generated_tokens"] / r["seconds"]
        r["useful_tokens"] = r["generated_tokens"] + prompt_tokens  # every generated token is kept (EOS ignored)
        r["useful_flop_per_s"] = r["useful_tokens"] * counts["flops_per_token"] / r["seconds"]
        r["matmul_limit_fraction"] = r["useful_flop_per_s"] / limit["flop_per_s"]
        rows.append(
            {
                "system": name,
                **r,
                "kv_peak_MiB": r["kv_peak_bytes"] / 2**20,
                "useful_TFLOP_s": r["useful_flop_per_s"] / 1e12,
            }
        )
    print_table(
        rows,
        [
            "system",
            "leaves",
            "generated_tokens",
            "forward_tokens",
            "kv_peak_MiB",
            "seconds",
            "tokens_per_s",
            "useful_TFLOP_s",
            "matmul_limit_fraction",
        ],
    )
    ratios = {
        "analytic_generated_token_ratio": analytic_ratio(spec),
        "measured_generated_token_ratio": systems["hf_generate"]["generated_tokens"]
        / systems["engine_tree"]["generated_tokens"],
        "engine_tree_speedup_vs_hf_generate": systems["hf_generate"]["seconds"] / systems["engine_tree"]["seconds"],
        "engine_tree_speedup_vs_engine_noshare": systems["engine_noshare"]["seconds"]
        / systems["engine_tree"]["seconds"],
        "engine_flat_speedup_vs_hf_generate": systems["hf_generate"]["seconds"] / systems["engine_flat"]["seconds"],
        "kv_peak_ratio_hf_generate_over_engine_tree": systems["hf_generate"]["kv_peak_bytes"]
        / systems["engine_tree"]["kv_peak_bytes"],
    }
    ratios["speedup_over_analytic"] = (
        ratios["engine_tree_speedup_vs_hf_generate"] / ratios["analytic_generated_token_ratio"]
    )
    compile_comparison = compare_compiled(args, model, tok, prompts, spec, cascade) if args.compile else None
    if compile_comparison:
        ratios.update(compile_comparison["ratios"])
    dtype_comparison = None
    if args.against_dtype:
        dtype_comparison = compare_dtypes(args, model, prompts, spec, systems, cascade)
        ratios.update(dtype_comparison["ratios"])
    ratios["engine_flat_matmul_limit_fraction"] = systems["engine_flat"]["matmul_limit_fraction"]
    ratios["engine_tree_matmul_limit_fraction"] = systems["engine_tree"]["matmul_limit_fraction"]
    for k, v in ratios.items():
        print(f"{k}: {v:.3g}")
    write_json(
        args.json,
        {
            "machine": machine(),
            "device": device,
            "dtype": str(model.dtype).replace("torch.", ""),
            "model": args.model,
            "cascade": cascade,
            "prompts": len(prompts),
            "prompt_tokens": prompt_tokens,
            "branching": list(spec.branching),
            "segment_tokens": spec.segment_tokens,
            **counts,
            "matmul_limit": limit,
            "systems": systems,
            "dtype_comparison": dtype_comparison,
            "compile_comparison": compile_comparison,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
