"""Summaries of end-to-end runs: per-system means and spread over seeds, headline ratios, markdown tables, plots."""

from __future__ import annotations

import statistics
from pathlib import Path

PHASES = ("rollout_s", "scoring_s", "logprobs_s", "training_s")
LABELS = {
    "treerpo": "treerpo TreeRPO",
    "grpo": "treerpo GRPO",
    "trl": "TRL GRPOTrainer",
    "trl_rollout": "TRL GRPOTrainer + treerpo rollout",
    "trl_treerpo": "TRL TreeRPOTrainer",
}


def _median(values):
    return statistics.median(values) if values else float("nan")


def run_summary(run: dict) -> dict:
    """Per-step medians (the first step, a warm-up, left out when there are more) and the run's totals."""
    steps = run["steps"][1:] if len(run["steps"]) > 1 else run["steps"]
    out = {
        k: _median([s[k] for s in steps])
        for k in ("step_s", *PHASES, "tokens_generated", "tokens_trained", "response_tokens_mean")
    }
    out["generated_tokens_per_s"] = _median([s["tokens_generated"] / s["rollout_s"] for s in steps])
    out["trained_tokens_per_s"] = _median([s["tokens_trained"] / (s["logprobs_s"] + s["training_s"]) for s in steps])
    out["peak_memory_MiB"] = run["peak_memory_MiB"]
    out["wall_s"] = sum(s["step_s"] for s in run["steps"])
    out["total_generated"] = sum(s["tokens_generated"] for s in run["steps"])
    if run["evals"]:
        out["initial_accuracy"] = run["evals"][0]["accuracy"]
        out["final_accuracy"] = run["evals"][-1]["accuracy"]
    return out


def mean_spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


FINAL_EVALS = 3  # TRL's final accuracy: the mean of its last evaluations (one is +-0.03 noise on 256 problems)


def final_accuracy(run: dict) -> float:
    trained = [e for e in run["evals"] if e["step"] > 0] or run["evals"]
    return statistics.fmean(e["accuracy"] for e in trained[-FINAL_EVALS:])


def first_reach(run: dict, target: float) -> dict | None:
    """The first evaluation after step 0 from which ``run`` holds ``target`` accuracy: that evaluation and the
    next (when there is one) average at least ``target``, so one lucky point does not count."""
    evals = [e for e in run["evals"] if e["step"] > 0]
    for i, e in enumerate(evals):
        if statistics.fmean(x["accuracy"] for x in evals[i : i + 2]) >= target:
            return e
    return None


def summarize(runs: list[dict]) -> dict:
    """Everything the report prints: per system (mean/spread over seeds), ratios, and target crossings."""
    systems = [s for s in LABELS if any(r["system"] == s for r in runs)]
    per_run = {(r["system"], r["seed"]): run_summary(r) for r in runs}
    by_system = {}
    for system in systems:
        summaries = [v for (s, _), v in per_run.items() if s == system]
        keys = summaries[0].keys()
        by_system[system] = {k: mean_spread([x.get(k) for x in summaries]) for k in keys}
    ratios, spread = {}, {}
    seeds = sorted({r["seed"] for r in runs})

    def paired(name, num, den, key="step_s"):
        values = [
            per_run[(num, s)][key] / per_run[(den, s)][key]
            for s in seeds
            if (num, s) in per_run and (den, s) in per_run
        ]
        if values:
            ratios[name] = statistics.fmean(values)
            spread[name] = mean_spread(values)

    paired("grpo_step_speedup_vs_trl", "trl", "grpo")
    paired("treerpo_step_speedup_vs_trl", "trl", "treerpo")
    paired("treerpo_step_speedup_vs_grpo", "grpo", "treerpo")
    paired("grpo_rollout_speedup_vs_trl", "trl", "grpo", "rollout_s")
    paired("grpo_training_speedup_vs_trl", "trl", "grpo", "training_s")
    paired("trl_peak_memory_over_grpo", "trl", "grpo", "peak_memory_MiB")
    paired("trl_rollout_step_speedup_vs_trl", "trl", "trl_rollout")
    paired("trl_rollout_rollout_speedup_vs_trl", "trl", "trl_rollout", "rollout_s")
    paired("trl_treerpo_step_speedup_vs_trl", "trl", "trl_treerpo")
    paired("trl_treerpo_wall_clock_speedup_vs_trl", "trl", "trl_treerpo", "wall_s")
    crossings = _crossings(runs, seeds, ratios, spread)
    return {"systems": by_system, "ratios": ratios, "ratio_spread": spread, "crossings": crossings, "seeds": seeds}


def _crossings(runs, seeds, ratios, spread) -> dict:
    """Per seed: when each treerpo system first holds TRL's final held-out accuracy (mean of its last evaluations)
    of the same seed; TRL's wall-clock and tokens are those of its whole run."""
    run_of = {(r["system"], r["seed"]): r for r in runs}
    out = {}
    for system in ("treerpo", "grpo", "trl_rollout", "trl_treerpo"):
        rows, wall_ratios, token_ratios = [], [], []
        for seed in seeds:
            trl, ours = run_of.get(("trl", seed)), run_of.get((system, seed))
            if not trl or not ours or not trl["evals"]:
                continue
            target = {**trl["evals"][-1], "accuracy": final_accuracy(trl)}
            hit = first_reach(ours, target["accuracy"])
            rows.append(
                {
                    "seed": seed,
                    "trl_final_accuracy": target["accuracy"],
                    "trl_wall_s": target["wall_s"],
                    "trl_tokens": target["tokens_generated"],
                    "reached": hit is not None,
                    "wall_s": hit and hit["wall_s"],
                    "tokens": hit and hit["tokens_generated"],
                    "step": hit and hit["step"],
                }
            )
            if hit:
                wall_ratios.append(target["wall_s"] / max(hit["wall_s"], 1e-9))
                token_ratios.append(target["tokens_generated"] / max(hit["tokens_generated"], 1))
        if rows:
            out[system] = rows
            if len(wall_ratios) == len(rows):  # a ratio only when every seed reached the target
                for name, values in (
                    (f"{system}_wall_clock_to_trl_final_accuracy_speedup", wall_ratios),
                    (f"{system}_tokens_to_trl_final_accuracy_saving", token_ratios),
                ):
                    ratios[name] = statistics.fmean(values)
                    spread[name] = mean_spread(values)
    return out


# ---- text ---------------------------------------------------------------------------------------------
def _pm(stat: dict, fmt: str = "{:.3g}") -> str:
    if stat["mean"] is None:
        return "-"
    if stat["n"] > 1:
        return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"
    return fmt.format(stat["mean"])


def markdown_tables(summary: dict, header: str) -> str:
    cols = [
        ("step_s", "s/step"),
        ("rollout_s", "rollout s"),
        ("scoring_s", "scoring s"),
        ("logprobs_s", "old/ref log-probs s"),
        ("training_s", "training s"),
        ("generated_tokens_per_s", "generated tok/s"),
        ("trained_tokens_per_s", "trained tok/s"),
        ("peak_memory_MiB", "peak MiB"),
        ("response_tokens_mean", "response tokens"),
        ("tokens_generated", "generated tok/step"),
    ]
    lines = [header, "", "| system | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for system, stats in summary["systems"].items():
        lines.append(f"| {LABELS[system]} | " + " | ".join(_pm(stats[k]) for k, _ in cols) + " |")
    if any("final_accuracy" in s for s in summary["systems"].values()):
        lines += [
            "",
            "| system | held-out accuracy start | end | run wall-clock s | generated tokens |",
            "|---|---|---|---|---|",
        ]
        for system, stats in summary["systems"].items():
            lines.append(
                f"| {LABELS[system]} | {_pm(stats['initial_accuracy'])} | {_pm(stats['final_accuracy'])} | "
                f"{_pm(stats['wall_s'], '{:.0f}')} | {_pm(stats['total_generated'], '{:.3g}')} |"
            )
    for system, rows in summary["crossings"].items():
        lines += [
            "",
            f"{LABELS[system]} reaching TRL's final held-out accuracy (same seed; TRL final = mean of its "
            f"last {FINAL_EVALS} evaluations; reached = an evaluation and the next average at least that):",
            "",
            "| seed | TRL final | TRL wall s | TRL tokens | reached at step | wall s | tokens |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['seed']} | {r['trl_final_accuracy']:.3f} | {r['trl_wall_s']:.0f} | {r['trl_tokens']:,} | "
                + (f"{r['step']} | {r['wall_s']:.0f} | {r['tokens']:,} |" if r["reached"] else "not reached | - | - |")
            )
    lines += ["", "| ratio | mean | spread over seeds (min - max) |", "|---|---|---|"]
    for name, value in summary["ratios"].items():
        s = summary["ratio_spread"][name]
        lines.append(f"| {name} | {value:.3g} | {s['min']:.3g} - {s['max']:.3g} (n={s['n']}) |")
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------------
def plot_all(runs: list[dict], summary: dict, out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if any(r["evals"] for r in runs):
        for x_key, x_label, name in (
            ("wall_s", "training wall-clock (s, evaluation excluded)", "accuracy_vs_wallclock"),
            ("tokens_generated", "generated tokens", "accuracy_vs_tokens"),
        ):
            fig, ax = plt.subplots(figsize=(7, 4))
            for system in summary["systems"]:
                curves = [r["evals"] for r in runs if r["system"] == system and r["evals"]]
                if not curves:
                    continue
                points = min(len(c) for c in curves)
                xs = [statistics.fmean(c[i][x_key] for c in curves) for i in range(points)]
                ys = [[c[i]["accuracy"] for c in curves] for i in range(points)]
                (line,) = ax.plot(xs, [statistics.fmean(y) for y in ys], marker="o", ms=3, label=LABELS[system])
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2, color=line.get_color())
            ax.set_xlabel(x_label)
            ax.set_ylabel("held-out accuracy (greedy)")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            paths.append(out_dir / f"{name}.png")
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(summary["systems"])
    left = [0.0] * len(names)
    for phase in PHASES:
        widths = [summary["systems"][s][phase]["mean"] or 0.0 for s in names]
        ax.barh([LABELS[s] for s in names], widths, left=left, label=phase[:-2])
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("seconds per step (median over steps, mean over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "step_breakdown.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
