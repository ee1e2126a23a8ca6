"""Where a decode step's time goes at paper scale: the model against everything else, per live-branch count.

Samples P prompts x (8, 8, 8) trees of 8-token segments (EOS ignored, seeded) on the tiny
embedded model with the engine's step profile on, so every step records its live branches,
whether branches forked, the model's time (forward + LM head) and the whole step's time.
P = 4, 64 puts plain decode steps at 32 ... 32,768 live branches. Reports:
- per live-branch count: plain step ms, model ms, not-model share;
- fork steps against the plain step with as many resulting branches;
- end to end, P = 64: this checkout against ``--baseline DIR`` (a checkout of the code before a change,
  imported from its own folder in a subprocess), interleaved repeats, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
SPEC = dict(branching=(8, 8, 8), segment_tokens=8, temperature=1.0)


def load():
    from treerpo.models.tiny import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    return model.eval(), tok


def prompts_for(tok, n: int) -> list[list[int]]:
    return [tok(f"{i % 17}+{i % 5}-{i % 11}=")["input_ids"] for i in range(n)]


def sampler_for(model, tok):
    from treerpo.engine.tree_sampler import TreeSampler

    return TreeSampler(model, tok, pool_tokens=1 << 19, ignore_eos=True)


def profile_steps(model, tok, prompt_counts: list[int], repeats: int) -> dict:
    """Median step and model time per (kind, forked, live branches after the step)."""
    from treerpo.tree import TreeSpec

    spec, sampler = TreeSpec(**SPEC), sampler_for(model, tok)
    sampler.sample(prompts_for(tok, 2), spec, seeds=[0, 1])  # warm-up
    sampler.profile = True
    samples = defaultdict(lambda: ([], []))
    for _ in range(repeats):
        for n in prompt_counts:
            sampler.step_records.clear()
            sampler.sample(prompts_for(tok, n), spec, seeds=list(range(n)))
            for r in sampler.step_records:
                if r["kind"] == "decode" and r["branches"]:
                    steps, models = samples[(r["forked"], r["branches"])]
                    steps.append(r["step_s"])
                    models.append(r["model_s"])
    return {key: (statistics.median(s), statistics.median(m)) for key, (s, m) in samples.items()}


def end_to_end_seconds(prompts: int) -> float:
    """One timed sample of ``prompts`` x (8, 8, 8) after a warm-up, with whatever treerpo is importable."""
    import time

    from treerpo.tree import TreeSpec

    model, tok = load()
    spec, sampler = TreeSpec(**SPEC), sampler_for(model, tok)
    sampler.sample(prompts_for(tok, 2), spec, seeds=[0, 1])
    start = time.perf_counter()
    sampler.sample(prompts_for(tok, prompts), spec, seeds=list(range(prompts)))
    return time.perf_counter() - start


def run_worker(src: Path, prompts: int, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, __file__, "--worker", str(prompts), "--threads", str(threads)],
        env=env,
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[4, 64], help="prompt counts of the step profile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--e2e-prompts", type=int, default=64)
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout of the code before a change (e.g. `git worktree add /tmp/before REV`)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker is not None:
        print(end_to_end_seconds(args.worker))
        return
    print(f"engine decode steps on the tiny embedded model, {SPEC}, EOS ignored; {machine()}")
    model, tok = load()
    steps = profile_steps(model, tok, args.prompts, args.repeats)
    plain = {b: v for (forked, b), v in steps.items() if not forked}
    rows = [
        {"live_branches": b, "step_ms": s * 1e3, "model_ms": m * 1e3, "not_model_share": 1 - m / s}
        for b, (s, m) in sorted(plain.items())
    ]
    print("\nplain decode steps (medians)")
    print_table(rows, ["live_branches", "step_ms", "model_ms", "not_model_share"])
    forks = [
        {
            "resulting_branches": b,
            "fork_step_ms": s * 1e3,
            "model_ms": m * 1e3,
            "plain_step_ms": plain[b][0] * 1e3,
            "fork_over_plain": s / plain[b][0],
        }
        for (forked, b), (s, m) in sorted(steps.items())
        if forked and b in plain
    ]
    print("\nfork steps against a plain step with as many resulting branches")
    print_table(forks, ["resulting_branches", "fork_step_ms", "model_ms", "plain_step_ms", "fork_over_plain"])
    ratios = {f"not_model_share_at_{r['live_branches']}": r["not_model_share"] for r in rows}
    ratios.update({f"fork_over_plain_at_{f['resulting_branches']}": f["fork_over_plain"] for f in forks})
    e2e = None
    if args.baseline is not None:
        times = {"this": [], "baseline": []}
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            times["baseline"].append(run_worker(args.baseline.resolve(), args.e2e_prompts, args.threads))
            times["this"].append(run_worker(ROOT, args.e2e_prompts, args.threads))
        e2e = {k: statistics.median(v) for k, v in times.items()}
        ratios["e2e_speedup_over_baseline"] = e2e["baseline"] / e2e["this"]
        print(
            f"\n{args.e2e_prompts} prompts x (8,8,8) x 8 tokens, end to end (median of {args.repeats}): "
            f"baseline {e2e['baseline']:.2f} s, this checkout {e2e['this']:.2f} s, "
            f"speed-up {ratios['e2e_speedup_over_baseline']:.2f}x; all runs {json.dumps(times)}"
        )
    write_json(
        args.json,
        {
            "machine": machine(),
            "spec": SPEC,
            "threads": args.threads,
            "plain_steps": rows,
            "fork_steps": forks,
            "end_to_end_seconds": e2e,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
