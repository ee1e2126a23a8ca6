"""Rollout throughput: treerpo's engine against independent sampling, side by side in one run.

    python benchmarks/rollout.py --model smollm2 --prompts 8 --branching 2 2 2 --segment-tokens 32 --json r.json

Systems, on the same prompts, tree shape and number of leaves:
  (a) engine        treerpo's TreeSampler (radix-shared prompt, children fork from the parent's KV)
  (b) engine_noshare the same engine with prefix sharing off: every leaf an independent chain of segments
  (c) hf_generate   Hugging Face generate with num_return_sequences = leaves (how TRL samples without vLLM)
and, for plain sampling (depth-1 trees, nothing to share), the engine against generate.
Full segments are generated (EOS ignored) so every system produces the tokens the shape asks for.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, timed, write_json  # noqa: E402

from treerpo.attention import enable_tree_attention  # noqa: E402
from treerpo.engine.tree_sampler import TreeSampler  # noqa: E402
from treerpo.generation import left_pad  # noqa: E402
from treerpo.models.tiny import load_model_and_tokenizer  # noqa: E402
from treerpo.tree import TreeSpec  # noqa: E402

PROMPTS = ["Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether?\nAnswer:",
           "Question: Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of babysitting. "
           "How much did she earn?\nAnswer:",
           "Question: A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?\nAnswer:",
           "Question: James writes a 3-page letter to 2 different friends twice a week. How many pages a year?\nAnswer:"]


def load(name: str):
    if name == "smollm2":
        from treerpo.models.smollm2 import smollm2_dir

        name = smollm2_dir()
    model, tok = load_model_and_tokenizer(None if name == "tiny" else name)
    return enable_tree_attention(model).eval(), tok


def run_engine(model, tok, prompts, spec, share: bool, pool_tokens: int, cascade: bool = True):
    sampler = TreeSampler(model, tok, pool_tokens=pool_tokens, share_prefixes=share, ignore_eos=True, cascade=cascade)
    if share:
        trees, seconds = timed(lambda: sampler.sample(prompts, spec, seeds=range(len(prompts))))
    else:  # the same leaves, each an independent chain: G copies of the prompt, branching 1 at every level
        chain = TreeSpec((1,) * spec.depth, spec.segment_tokens, spec.max_prompt_tokens, spec.temperature)
        repeated = [p for p in prompts for _ in range(spec.max_leaves)]
        trees, seconds = timed(lambda: sampler.sample(repeated, chain, seeds=range(len(repeated))))
    return {"generated_tokens": sum(t.generated_tokens for t in trees), "forward_tokens": sampler.runner.forward_tokens,
            "kv_peak_bytes": sampler.pool.peak_used_bytes, "seconds": seconds,
            "leaves": sum(len(t.leaves()) for t in trees)}


@torch.no_grad()
def run_generate(model, tok, prompts, leaves: int, new_tokens: int):
    ids, mask = left_pad(prompts, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, "cpu")
    ids, mask = ids.to(model.device), mask.to(model.device)
    out, seconds = timed(lambda: model.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
        num_return_sequences=leaves, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        pad_token_id=tok.pad_token_id or tok.eos_token_id))
    rows = out.shape[0]
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    bytes_per_token = 2 * layers * heads * head_dim * model.dtype.itemsize
    return {"generated_tokens": rows * new_tokens, "forward_tokens": int(mask.sum()) * leaves + rows * new_tokens,
            "kv_peak_bytes": rows * out.shape[1] * bytes_per_token, "seconds": seconds, "leaves": rows}


def analytic_ratio(spec: TreeSpec) -> float:
    """Generated tokens of independent leaves over those of the tree: G*d*L / L*(b1 + b1 b2 + ...)."""
    return spec.max_leaves * spec.depth * spec.segment_tokens / spec.max_generated_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a local model folder")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--branching", type=int, nargs="+", default=[2, 2, 2])
    parser.add_argument("--segment-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per system (the fastest is kept)")
    parser.add_argument("--pool-tokens", type=int, default=1 << 15)
    parser.add_argument("--cascade", choices=["on", "off"], default="on",
                        help="engine decode reads the prefix siblings share once per group (on) or per branch (off)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load(args.model)
    texts = (PROMPTS * args.prompts)[:args.prompts]
    if args.model == "tiny":
        texts = [f"{i + 1}+{i + 2}-3=" for i in range(args.prompts)]
    prompts = [tok(t)["input_ids"] for t in texts]
    spec = TreeSpec(tuple(args.branching), args.segment_tokens, max_prompt_tokens=256)
    flat = TreeSpec((spec.max_leaves,), spec.depth * spec.segment_tokens, max_prompt_tokens=256)
    print(f"rollout benchmark on {machine()}; model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"params, {model.dtype}); {len(prompts)} prompts; tree {list(spec.branching)} x {spec.segment_tokens} "
          f"tokens = {spec.max_leaves} leaves of {spec.max_new_tokens} tokens")

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
    rows = []
    for name, r in systems.items():
        r["tokens_per_s"] = r["generated_tokens"] / r["seconds"]
        rows.append({"system": name, **r, "kv_peak_MiB": r["kv_peak_bytes"] / 2**20})
    print_table(rows, ["system", "leaves", "generated_tokens", "forward_tokens", "kv_peak_MiB", "seconds", "tokens_per_s"])
    ratios = {
        "analytic_generated_token_ratio": analytic_ratio(spec),
        "measured_generated_token_ratio": systems["hf_generate"]["generated_tokens"] / systems["engine_tree"]["generated_tokens"],
        "engine_tree_speedup_vs_hf_generate": systems["hf_generate"]["seconds"] / systems["engine_tree"]["seconds"],
        "engine_tree_speedup_vs_engine_noshare": systems["engine_noshare"]["seconds"] / systems["engine_tree"]["seconds"],
        "engine_flat_speedup_vs_hf_generate": systems["hf_generate"]["seconds"] / systems["engine_flat"]["seconds"],
        "kv_peak_ratio_hf_generate_over_engine_tree": systems["hf_generate"]["kv_peak_bytes"] / systems["engine_tree"]["kv_peak_bytes"],
    }
    ratios["speedup_over_analytic"] = ratios["engine_tree_speedup_vs_hf_generate"] / ratios["analytic_generated_token_ratio"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    write_json(args.json, {"machine": machine(), "model": args.model, "cascade": cascade, "prompts": len(prompts),
                           "branching": list(spec.branching), "segment_tokens": spec.segment_tokens,
                           "systems": systems, "ratios": ratios})


if __name__ == "__main__":
    main()
