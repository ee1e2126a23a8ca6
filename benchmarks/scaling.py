"""Data-parallel scaling of the trainer under torchrun: steps/s and tokens/s at 1, 2, ... ranks.

    python benchmarks/scaling.py --ranks 1 2 --parallel ddp --json scaling.json
    python benchmarks/scaling.py --ranks 1 2 4 8 --parallel fsdp --model PATH --prompts-per-rank 32

Each point is a real ``torchrun --nproc_per_node N -m treerpo.train --parallel MODE`` run (1 rank too, so every
point pays the same launch and collectives), timed from its own ``metrics.jsonl``: the median ``step_s`` of the
steps after the first (warm-up) on rank 0, whose steps end with the collectives every rank joins.

- weak scaling: ``prompts-per-rank`` prompts on each rank (the global batch grows with N); efficiency =
  tokens/s at N / (N x tokens/s at 1).
- strong scaling: ``global-prompts`` prompts a step whatever N; speed-up = steps/s at N / steps/s at 1.

``ratios`` holds those headline figures. Tokens are the step's generated plus trained tokens over all ranks.
On a machine with fewer cores (or GPUs) than ranks, the ranks share them and the figures only show it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, write_json


def run_point(kind: str, ranks: int, prompts: int, args, folder: Path) -> dict:
    out = folder / f"{kind}-{args.parallel}-{ranks}ranks-{prompts}prompts"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "treerpo.train",
        "--parallel",
        args.parallel,
        "--output-dir",
        str(out),
        "--max-steps",
        str(args.steps),
        "--prompts-per-step",
        str(prompts),
        "--eval-size",
        "8",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--device",
        args.device,
    ]
    if args.model:
        command += ["--model", args.model]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)}
    done = subprocess.run(command + args.extra, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # after warm-up
    step_s = float(np.median([r["step_s"] for r in steps]))
    tokens = float(np.median([r["tokens_generated"] + r["tokens_trained"] for r in steps]))
    return {
        "ranks": ranks,
        "prompts_per_step": prompts,
        "step_s": step_s,
        "steps_per_s": 1 / step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "rollout_s": float(np.median([r["rollout_s"] for r in steps])),
        "training_s": float(np.median([r["training_s"] for r in steps])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=6, help="steps a run (the first is not timed)")
    parser.add_argument("--prompts-per-rank", type=int, default=8, help="weak scaling")
    parser.add_argument("--global-prompts", type=int, default=16, help="strong scaling")
    parser.add_argument("--model", default=None, help="default: the embedded tiny model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads a rank (CPU)")
    parser.add_argument("--json", default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more treerpo.train options")
    args = parser.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    if 1 not in args.ranks:
        raise SystemExit("--ranks must include 1: the ratios are against one rank")
    with tempfile.TemporaryDirectory(prefix="treerpo-scaling-") as tmp:
        weak = [run_point("weak", n, args.prompts_per_rank * n, args, Path(tmp)) for n in args.ranks]
        strong = [run_point("strong", n, args.global_prompts, args, Path(tmp)) for n in args.ranks]
    base_weak, base_strong = weak[args.ranks.index(1)], strong[args.ranks.index(1)]
    ratios = {}
    for w, s in zip(weak, strong, strict=True):
        if w["ranks"] != 1:
            ratios[f"weak_efficiency_{w['ranks']}_ranks"] = w["tokens_per_s"] / (w["ranks"] * base_weak["tokens_per_s"])
            ratios[f"weak_tokens_per_s_speedup_{w['ranks']}_ranks"] = w["tokens_per_s"] / base_weak["tokens_per_s"]
            ratios[f"strong_steps_per_s_speedup_{s['ranks']}_ranks"] = s["steps_per_s"] / base_strong["steps_per_s"]
    where = machine()
    print(
        f"treerpo data-parallel scaling, --parallel {args.parallel}, model {args.model or 'embedded tiny'}, "
        f"{args.steps - 1} timed steps a run (median), on {where}"
    )
    columns = [
        "ranks",
        "prompts_per_step",
        "step_s",
        "steps_per_s",
        "tokens_per_step",
        "tokens_per_s",
        "rollout_s",
        "training_s",
    ]
    print(f"weak scaling: {args.prompts_per_rank} prompts a rank")
    print_table(weak, columns)
    print(f"strong scaling: {args.global_prompts} prompts a step")
    print_table(strong, columns)
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    write_json(
        args.json,
        {
            "machine": where,
            "parallel": args.parallel,
            "model": args.model or "embedded tiny",
            "steps_timed": args.steps - 1,
            "weak": weak,
            "strong": strong,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
