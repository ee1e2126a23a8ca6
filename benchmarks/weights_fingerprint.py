"""What the engine's weights check costs a rollout: ``WeightsWatch.changed()`` (each parameter's version, storage
and fp64 sum, compared before every rollout so that a fused optimizer step cannot leave stale K/V in the cache)
against the rollout it precedes, on the same model and machine.

    python benchmarks/weights_fingerprint.py --model smollm2 --json fingerprint.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, timed, write_json
from rollout import PROMPTS, load

from treerpo.engine.tree_sampler import TreeSampler
from treerpo.tree import TreeSpec


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="tiny (the embedded model) or smollm2")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--branching", type=int, nargs="+", default=[2, 2, 2])
    parser.add_argument("--segment-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed fingerprint checks (the fastest is kept)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    texts = [f"{i + 1}+{i + 2}-3=" for i in range(args.prompts)] if args.model == "tiny" else PROMPTS
    prompts = [tok(t)["input_ids"] for t in (texts * args.prompts)[: args.prompts]]
    spec = TreeSpec(tuple(args.branching), args.segment_tokens, max_prompt_tokens=256)
    sampler = TreeSampler(model, tok, pool_tokens=1 << 15, ignore_eos=True)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"weights fingerprint on {machine()}; model {args.model} ({params / 1e6:.1f}M parameters); compared: one "
        f"WeightsWatch.changed() against one rollout of {len(prompts)} prompts, tree {list(spec.branching)} x "
        f"{spec.segment_tokens} tokens (the rollout includes one check)"
    )
    check = min(timed(sampler.weights.changed)[1] for _ in range(args.repeats))
    _, rollout = timed(lambda: sampler.sample(prompts, spec, seeds=range(len(prompts))))
    print(f"fingerprint check {check * 1e3:.1f} ms, rollout {rollout:.2f} s: {check / rollout:.2%} of a rollout")
    write_json(
        args.json,
        {
            "machine": machine(),
            "model": args.model,
            "parameters": params,
            "fingerprint_s": check,
            "rollout_s": rollout,
            "ratios": {"fingerprint_over_rollout": check / rollout},
        },
    )


if __name__ == "__main__":
    main()
