"""End to end: treerpo TreeRPO, treerpo GRPO and TRL's GRPOTrainer side by side, same model, prompts and budget,
with the two ways a TRL user takes treerpo: GRPOTrainer with treerpo's rollout_func (trl_rollout) and TRL's
Trainer running TreeRPO (trl_treerpo, TreeRPOTrainer).

    python benchmarks/e2e.py --preset tiny --json e2e_tiny.json                 # 5 systems x 3 seeds, CPU
    python benchmarks/e2e.py --preset tiny --budget tokens --json e2e_tiny_tokens.json
    python benchmarks/e2e.py --preset smollm2 --json e2e_smollm2.json           # SmolLM2-135M on GSM8K
    python benchmarks/e2e.py --preset qwen1.5b --json e2e_qwen.json             # a GPU; random weights

Budget modes: ``leaves`` (GRPO's group size = the tree's leaves per prompt: equal samples) and ``tokens``
(GRPO's group size = the tree's generated tokens per prompt / answer length: equal nominal generated
tokens per step). Run length: every system gets the same nominal generated-token budget, so in ``leaves``
mode TreeRPO, whose tree generates fewer tokens a step, runs more steps (``Preset.steps_for``).
Each (system, seed) runs in its own process (so peak memory is its own), seeds
interleaved with systems so that machine noise falls on all of them. Writes ``--out`` (runs, tables,
plots) and ``--json`` with the headline ratios under ``ratios`` (their spread under ``ratio_spread``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_json
from e2e_presets import PRESETS, get_preset
from e2e_report import markdown_tables, plot_all, summarize
from e2e_systems import SYSTEMS, TRL_SYSTEMS

WORKER = Path(__file__).parent / "e2e_systems.py"


def check_trl(systems) -> None:
    if not set(systems) & set(TRL_SYSTEMS):
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit(
            "the TRL systems need trl: pip install -c constraints.txt -e '.[bench]' "
            "(or leave them out with --systems treerpo grpo)"
        ) from None


def run_one(
    preset: str, system: str, seed: int, budget: str, steps, out_dir: Path, timeout: float, threads: int | None = None
) -> dict:
    out = out_dir / f"run_{system}_seed{seed}.json"
    log = out_dir / f"run_{system}_seed{seed}.log"
    cmd = (
        [
            sys.executable,
            str(WORKER),
            "--preset",
            preset,
            "--system",
            system,
            "--seed",
            str(seed),
            "--budget",
            budget,
            "--out",
            str(out),
        ]
        + (["--steps", str(steps)] if steps else [])
        + (["--threads", str(threads)] if threads else [])
    )
    started = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=WORKER.parent)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{system} seed {seed} ran past {timeout:.0f} s; its log: {log}") from None
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{system} seed {seed} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))
    print(f"  {system} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(out.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--budget", choices=("leaves", "tokens"), default="leaves")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--out", default=None, help="folder for runs, logs, tables, plots (default e2e_<preset>_<budget>)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of every run (default: torch's)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--report-only",
        metavar="E2E_JSON",
        default=None,
        help="rebuild tables, plots and ratios from a saved e2e.json (runs nothing)",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(Path(args.report_only).read_text())
        return report(
            saved["runs"],
            saved["description"],
            saved["preset"],
            saved["budget"],
            saved["seeds"],
            saved["machine"],
            Path(args.out or Path(args.report_only).parent),
            args.json,
        )
    check_trl(args.systems)
    preset = get_preset(args.preset, steps=args.steps)
    seeds = args.seeds or list(preset.seeds)
    out_dir = Path(args.out or f"e2e_{preset.name}_{args.budget}").resolve()  # the workers run in benchmarks/
    out_dir.mkdir(parents=True, exist_ok=True)
    group = preset.group_size(args.budget)
    describe = (
        f"e2e preset {preset.name} on {machine()}: model {preset.model}, {Path(preset.dataset).name}, "
        f"{preset.prompts_per_step} prompts/step, {preset.steps} steps, seeds {seeds}; budget {args.budget}: "
        f"TreeRPO tree {list(preset.branching)} x {preset.segment_tokens} tokens ({preset.leaves} leaves, "
        f"{preset.tree_tokens_per_prompt} tokens/prompt at most), GRPO G={group} x {preset.max_new_tokens} "
        f"tokens ({group * preset.max_new_tokens} tokens/prompt at most); equal generated-token budget per run: "
        f"GRPO and TRL {preset.steps} steps, TreeRPO {preset.steps_for('treerpo', args.budget)} steps; "
        f"systems {args.systems}; torch threads {args.threads or 'default'}"
    )
    print(describe, flush=True)
    runs = [
        run_one(preset.name, system, seed, args.budget, args.steps, out_dir, args.timeout, args.threads)
        for seed in seeds
        for system in args.systems
    ]
    report(runs, describe, preset.name, args.budget, seeds, machine(), out_dir, args.json)


def report(runs, describe, preset_name, budget, seeds, machine_name, out_dir: Path, json_path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    tables = markdown_tables(
        summary, f"{describe}\n\n(mean ± std over seeds; per-step figures are medians over steps after the first)"
    )
    print()
    print(tables)
    plots = plot_all(runs, summary, out_dir, f"{preset_name}, budget {budget}, {machine_name}")
    (out_dir / "tables.md").write_text(tables + "\n")
    print(f"\ntables: {out_dir / 'tables.md'}; plots: " + ", ".join(str(p) for p in plots))
    payload = {
        "machine": machine_name,
        "preset": preset_name,
        "budget": budget,
        "seeds": seeds,
        "description": describe,
        "summary": summary,
        "ratios": summary["ratios"],
        "ratio_spread": summary["ratio_spread"],
        "runs": runs,
    }
    (out_dir / "e2e.json").write_text(json.dumps(payload, indent=1))
    write_json(json_path, payload)


if __name__ == "__main__":
    main()
