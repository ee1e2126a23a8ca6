"""Learning efficiency at equal generated tokens: which configuration learns the most per generated token (and
per second of training)?

    python benchmarks/learning.py --configs "grpo:group_size=8" "treerpo:branching=4,2,2" \\
        "treerpo:branching=2,2,2,2,segment_tokens=8" --tokens 300000 --seeds 0 1 2 --threads 2 \\
        --out learning_runs --json learning.json

A configuration is ``[LABEL=]ALGO[:KEY=VALUE,KEY=VALUE...]``: an algorithm (``treerpo`` or ``grpo``) and
TrainConfig overrides (``python -m treerpo.train --help`` lists the keys; a list value such as ``branching=4,2,2``
takes the commas up to the next ``KEY=``). ``|`` gives alternatives, expanded as a grid (the ``--grid``
shorthand): ``"treerpo:branching=4,2,2|2,2,2,2,segment_tokens=8|12"`` is four configurations. ``--common``
applies overrides to every configuration; ``--config-file`` reads a YAML/JSON list of such strings or of
mappings (``{algo: treerpo, branching: [4, 2, 2], label: wide}``). Every configuration is checked against
TrainConfig before any run starts. Defaults are the trainer's: the embedded tiny model on the synthetic
chain-arithmetic task, 32 prompts a step, held-out greedy pass@1 on 256 problems.

Each (configuration, seed) is one ``python -m treerpo.train`` process (the project's trainer; nothing here
trains), run one at a time, its output folder kept under ``--out``. The trainer has no generated-token stop,
so a run is given enough steps to pass the budget (``--tokens``, and ``--seconds`` of training when given) and
then one more evaluation; when its tokens per step fall short of the estimate, it is continued with the
trainer's ``--resume`` (a longer ``max_steps``) until it does. Its curve, read from ``metrics.jsonl``
(generated tokens and seconds of every step, held-out accuracy at every evaluation, the step-0 accuracy from
``summary.json``), is then cut at the budget: the accuracy at exactly the budget is interpolated linearly (in
generated tokens) between the last evaluation before it and the first one after it, and the seconds at the
budget linearly within the step that crosses it. Seconds are training seconds (the steps' ``step_s``;
evaluation excluded). A rerun skips every run of ``--out`` that already passed the budget, and extends one
that did not (a larger ``--tokens`` continues the saved runs).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_json
from e2e_report import mean_spread

REPO = Path(__file__).resolve().parents[1]
# set by this script for every run, not by a configuration
RESERVED = {
    "seed": "--seeds",
    "output_dir": "--out",
    "max_steps": "--tokens / --seconds",
    "resume": "--out",
    "eval_every": "--eval-every / --evals",
    "threads": "--threads",
    "save_every": "(final step only)",
}
FIRST_GUESS_FILL = 0.8  # first attempt: steps for the budget if a step generates 80% of its nominal tokens
INTERPOLATION_NOTE = (
    "accuracy at the budget: linear interpolation (in generated tokens) between the last held-out "
    "evaluation before the budget and the first one after it; seconds at the budget: linear "
    "within the step that crosses it; seconds are training seconds (evaluation excluded)"
)


class ConfigStringError(ValueError):
    pass


# ---- configurations -----------------------------------------------------------------------------------
@dataclass
class RunConfig:
    label: str
    algo: str
    overrides: dict = field(default_factory=dict)  # validated values, TrainConfig types
    source: str = ""  # the string (or file entry) it came from

    @property
    def values(self) -> dict:
        return {"algo": self.algo, **self.overrides}


def _split_pairs(body: str, source: str) -> list[tuple[str, str]]:
    """``k=v,k=v1,v2`` -> [(k, v), (k, "v1,v2")]: a piece without ``=`` continues the previous value."""
    pairs: list[list[str]] = []
    for piece in body.split(","):
        piece = piece.strip()
        if not piece:
            continue
        if "=" in piece:
            key, value = piece.split("=", 1)
            if not key.strip():
                raise ConfigStringError(f"config {source!r}: {piece!r} has no key before '='")
            pairs.append([key.strip(), value.strip()])
        elif pairs:
            pairs[-1][1] += "," + piece
        else:
            raise ConfigStringError(f"config {source!r}: {piece!r} is not KEY=VALUE")
    return [(k, v) for k, v in pairs]


def _check(label: str, algo: str, raw: dict, source: str) -> RunConfig:
    from treerpo.config import ConfigError, make_config

    reserved = sorted(set(raw) & set(RESERVED))
    if reserved:
        raise ConfigStringError(
            f"config {source!r}: {reserved} are set by this benchmark for every run ("
            + ", ".join(f"{k}: {RESERVED[k]}" for k in reserved)
            + ")"
        )
    try:
        config = make_config({"algo": algo, **raw})
    except ConfigError as err:
        raise ConfigStringError(f"config {source!r}: {err}") from None
    overrides = {k: getattr(config, k) for k in raw if k != "algo"}
    return RunConfig(label=label, algo=config.algo, overrides=overrides, source=source)


def parse_config(text: str, common: dict | None = None) -> list[RunConfig]:
    """One ``[LABEL=]ALGO[:KEY=VALUE,...]`` string -> its configurations (several when a value has ``|``)."""
    source = text.strip()
    head, _, body = source.partition(":")
    label = None
    if "=" in head:
        label, head = (s.strip() for s in head.split("=", 1))
    algo = head.strip()
    if algo not in ("treerpo", "grpo"):
        raise ConfigStringError(
            f"config {source!r}: the algorithm {algo!r} is not treerpo or grpo (write ALGO:KEY=VALUE,...)"
        )
    pairs = _split_pairs(body, source)
    keys = [k for k, _ in pairs]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ConfigStringError(f"config {source!r}: {duplicated} given twice")
    choices = [[(k, alt.strip()) for alt in v.split("|")] for k, v in pairs]
    grid = any(len(c) > 1 for c in choices)
    out = []
    for combo in itertools.product(*choices) if choices else [()]:
        raw = {**(common or {}), **dict(combo)}
        name = algo + (":" + ",".join(f"{k}={v}" for k, v in combo) if combo else "")
        if label:
            name = f"{label}[{name}]" if grid else label
        out.append(_check(name, algo, raw, source))
    return out


def parse_common(text: str | None) -> dict:
    if not text:
        return {}
    pairs = _split_pairs(text, f"--common {text}")
    if any("|" in v for _, v in pairs):
        raise ConfigStringError(f"--common {text!r}: alternatives ('|') belong in --configs")
    return dict(pairs)


def load_config_file(path: str, common: dict) -> list[RunConfig]:
    """A YAML/JSON list of configuration strings or mappings ({algo, label, KEY: VALUE...})."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, dict) and "configs" in data:
        data = data["configs"]
    if not isinstance(data, list):
        raise ConfigStringError(f"{path}: expected a list of configurations (strings or mappings)")
    out = []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            out += parse_config(entry, common)
        elif isinstance(entry, dict):
            entry = dict(entry)
            algo = str(entry.pop("algo", "treerpo"))
            label = entry.pop("label", None)
            raw = {**common, **entry}
            source = f"{path}[{i}]"
            name = label or algo + (":" + ",".join(f"{k}={_show(v)}" for k, v in entry.items()) if entry else "")
            if algo not in ("treerpo", "grpo"):
                raise ConfigStringError(f"config {source!r}: the algorithm {algo!r} is not treerpo or grpo")
            out.append(_check(str(name), algo, raw, source))
        else:
            raise ConfigStringError(f"{path}[{i}]: {entry!r} is neither a string nor a mapping")
    return out


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def nominal_tokens_per_step(values: dict) -> int:
    """Generated tokens of a step if no answer stopped early: prompts x the tree's tokens (treerpo) or x G answers."""
    from treerpo.config import make_config

    config = make_config(values)
    if config.algo == "grpo":
        return config.prompts_per_step * config.group_size * config.max_new_tokens
    width, per_prompt = 1, 0
    for b in config.branching:
        width *= b
        per_prompt += width * config.segment_tokens
    return config.prompts_per_step * per_prompt


# ---- one run ------------------------------------------------------------------------------------------
def run_dir_for(out: Path, config: RunConfig, eval_every: int, seed: int) -> Path:
    key = json.dumps({"values": config.values, "eval_every": eval_every}, sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", config.label).strip("_")[:60]
    return out / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}" / f"seed{seed}"


def read_run(run_dir: Path) -> dict | None:
    """Steps (cumulative tokens and seconds) and evaluations of a run folder; None when it holds none."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    tokens = seconds = 0.0
    steps, evals = [], []
    if summary is not None and summary.get("initial_eval_accuracy") is not None:
        evals.append({"step": 0, "tokens": 0, "seconds": 0.0, "accuracy": summary["initial_eval_accuracy"]})
    for r in records:
        tokens += r["tokens_generated"]
        seconds += r["step_s"]
        steps.append({"step": r["step"], "tokens": int(tokens), "seconds": seconds})
        if r.get("eval_accuracy") is not None:
            evals.append({"step": r["step"], "tokens": int(tokens), "seconds": seconds, "accuracy": r["eval_accuracy"]})
    return {
        "steps": steps,
        "evals": evals,
        "summary": summary,
        "finished": summary is not None and bool(steps) and summary.get("steps") == steps[-1]["step"],
    }


def passed(run: dict | None, tokens: int, seconds: float | None) -> bool:
    """The run has an evaluation at or past the token budget (and past ``seconds`` of training, when given)."""
    if not run or not run["finished"] or not run["evals"] or run["evals"][0]["step"] != 0:
        return False
    last = run["evals"][-1]
    return last["tokens"] >= tokens and (seconds is None or last["seconds"] >= seconds)


def steps_needed(run: dict | None, tokens: int, seconds: float | None, nominal: int) -> int:
    """max_steps for the next attempt: enough to pass the budget(s) at the observed (or guessed) rates."""
    if not run or not run["steps"]:
        return max(1, math.ceil(tokens / (nominal * FIRST_GUESS_FILL)))
    done = run["steps"][-1]
    per_step_tokens = done["tokens"] / done["step"]
    more = math.ceil(max(0, tokens - done["tokens"]) / max(per_step_tokens, 1) * 1.05)
    if seconds is not None:
        per_step_s = done["seconds"] / done["step"]
        more = max(more, math.ceil(max(0.0, seconds - done["seconds"]) / max(per_step_s, 1e-6) * 1.05))
    return done["step"] + max(1, more)


def run_one(
    config: RunConfig,
    seed: int,
    run_dir: Path,
    eval_every: int,
    tokens: int,
    seconds: float | None,
    threads: int | None,
    timeout: float,
    log=print,
) -> tuple[dict, str]:
    """Runs (or continues) one (configuration, seed) until it passes the budget; (its record, what was done)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "learning_config.json").write_text(json.dumps(config.values, indent=1, default=str))
    run = read_run(run_dir)
    if passed(run, tokens, seconds):
        return run, "found in --out"
    nominal = nominal_tokens_per_step(config.values)
    attempts, started = 0, time.perf_counter()
    while not passed(run, tokens, seconds):
        attempts += 1
        if attempts > 6:
            raise RuntimeError(
                f"{config.label} seed {seed}: still short of the budget after 6 attempts; see {run_dir / 'train.log'}"
            )
        has_checkpoint = (run_dir / "latest").exists() or any(run_dir.glob("checkpoint-*"))
        if not has_checkpoint:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (run_dir / "summary.json").unlink(missing_ok=True)
            run = None
        max_steps = steps_needed(run, tokens, seconds, nominal)
        cmd = (
            [
                sys.executable,
                "-m",
                "treerpo.train",
                "--config",
                str(run_dir / "learning_config.json"),
                "--output-dir",
                str(run_dir),
                "--seed",
                str(seed),
                "--max-steps",
                str(max_steps),
                "--eval-every",
                str(eval_every),
                "--save-every",
                "0",
            ]
            + (["--threads", str(threads)] if threads else [])
            + (["--resume"] if has_checkpoint else [])
        )
        with open(run_dir / "train.log", "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            try:
                proc = subprocess.run(
                    cmd,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    timeout=timeout,
                    env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"{config.label} seed {seed} ran past {timeout:.0f} s; its log: {run_dir / 'train.log'}"
                ) from None
        if proc.returncode != 0:
            tail = (run_dir / "train.log").read_text().strip().splitlines()[-15:]
            raise RuntimeError(
                f"{config.label} seed {seed} failed (exit {proc.returncode}); log "
                f"{run_dir / 'train.log'}:\n" + "\n".join(tail)
            )
        run = read_run(run_dir)
    verb = "ran" if attempts == 1 else f"ran in {attempts} attempts (--resume)"
    return run, f"{verb}, {time.perf_counter() - started:.0f} s"


# ---- curves -------------------------------------------------------------------------------------------
def _lerp(x0, y0, x1, y1, x):
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def seconds_at_tokens(run: dict, tokens: float) -> float:
    """Training seconds when the run had generated ``tokens`` (linear within the step that crosses it)."""
    prev = {"tokens": 0, "seconds": 0.0}
    for s in run["steps"]:
        if s["tokens"] >= tokens:
            return _lerp(prev["tokens"], prev["seconds"], s["tokens"], s["seconds"], tokens)
        prev = s
    raise ValueError(f"the run generated {prev['tokens']} tokens, short of {tokens}")


def cut_curve(evals: list[dict], axis: str, budget: float) -> list[dict]:
    """The evaluations up to ``budget`` on ``axis`` (tokens or seconds), ending with a point at exactly the
    budget: the accuracy interpolated between the evaluations on either side of it."""
    out = [e for e in evals if e[axis] <= budget]
    after = next((e for e in evals if e[axis] > budget), None)
    if out and out[-1][axis] == budget:
        return out
    if after is None or not out:
        raise ValueError(f"no evaluation on either side of {axis} = {budget}")
    last = out[-1]
    point = {
        "step": None,
        "interpolated": True,
        axis: budget,
        "accuracy": _lerp(last[axis], last["accuracy"], after[axis], after["accuracy"], budget),
    }
    other = "seconds" if axis == "tokens" else "tokens"
    point[other] = _lerp(last[axis], last[other], after[axis], after[other], budget)
    return out + [point]


def area(curve: list[dict], axis: str, budget: float) -> float:
    """Area under accuracy vs ``axis`` from 0 to the budget, divided by the budget (the mean accuracy over it)."""
    total = sum((b[axis] - a[axis]) * (a["accuracy"] + b["accuracy"]) / 2 for a, b in itertools.pairwise(curve))
    return total / budget


def first_reach(xs: list[float], ys: list[float], target: float) -> float | None:
    """The first x at which the piecewise-linear curve reaches ``target`` (None: never)."""
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y >= target:
            return x if i == 0 else _lerp(ys[i - 1], xs[i - 1], y, x, target)
    return None


def mean_curve(curves: list[list[dict]], axis: str) -> dict:
    """Mean, min and max over seeds on the union of their x values (each seed linear between its points), up to
    the shortest seed's end."""
    end = min(c[-1][axis] for c in curves)
    xs = sorted({p[axis] for c in curves for p in c if p[axis] <= end})
    per_seed = [[_interp(c, axis, x) for x in xs] for c in curves]
    ys = list(zip(*per_seed, strict=True))
    return {
        "x": xs,
        "mean": [statistics.fmean(y) for y in ys],
        "min": [min(y) for y in ys],
        "max": [max(y) for y in ys],
    }


def _interp(curve: list[dict], axis: str, x: float) -> float:
    for a, b in itertools.pairwise(curve):
        if a[axis] <= x <= b[axis]:
            return _lerp(a[axis], a["accuracy"], b[axis], b["accuracy"], x)
    return curve[-1]["accuracy"] if x >= curve[-1][axis] else curve[0]["accuracy"]


def analyse_run(run: dict, tokens: int, seconds: float | None) -> dict:
    curve = cut_curve(run["evals"], "tokens", tokens)
    out = {
        "curve_tokens": curve,
        "final_accuracy": curve[-1]["accuracy"],
        "auc": area(curve, "tokens", tokens),
        "seconds_at_budget": seconds_at_tokens(run, tokens),
        "initial_accuracy": run["evals"][0]["accuracy"],
        "steps_at_budget": next(s["step"] for s in run["steps"] if s["tokens"] >= tokens),
        "steps_run": run["steps"][-1]["step"],
        "tokens_run": run["steps"][-1]["tokens"],
        "evals_within_budget": sum(1 for e in run["evals"] if e["step"] and e["tokens"] <= tokens),
    }
    crossing = next(s for s in run["steps"] if s["tokens"] >= tokens)
    out["tokens_per_step"] = crossing["tokens"] / crossing["step"]  # mean over the steps up to the budget
    if seconds is not None:
        out["curve_seconds"] = cut_curve(run["evals"], "seconds", seconds)
        out["accuracy_at_seconds"] = out["curve_seconds"][-1]["accuracy"]
        out["auc_seconds"] = area(out["curve_seconds"], "seconds", seconds)
    else:
        out["curve_seconds"] = curve
    return out


def summarize(
    configs: list[RunConfig], results: dict, tokens: int, seconds: float | None, target: float | None
) -> dict:
    """Per configuration: spread over seeds, mean curves, target crossings; the headline ratios."""
    rows = []
    for config in configs:
        runs = [results[(config.label, s)] for s in sorted(s for (lab, s) in results if lab == config.label)]
        row = {"label": config.label, "algo": config.algo, "overrides": config.overrides, "n": len(runs)}
        for key in (
            "final_accuracy",
            "auc",
            "seconds_at_budget",
            "initial_accuracy",
            "steps_at_budget",
            "tokens_per_step",
        ) + (("accuracy_at_seconds", "auc_seconds") if seconds is not None else ()):
            row[key] = mean_spread([r[key] for r in runs])
        row["mean_curve_tokens"] = mean_curve([r["curve_tokens"] for r in runs], "tokens")
        row["mean_curve_seconds"] = mean_curve([r["curve_seconds"] for r in runs], "seconds")
        rows.append(row)
    grpo = [r for r in rows if r["algo"] == "grpo"]
    tree = [r for r in rows if r["algo"] == "treerpo"]
    best = lambda rs, key: max(rs, key=lambda r: r[key]["mean"]) if rs else None  # noqa: E731
    target_source = "--target"
    if target is None and grpo:
        target, target_source = (
            best(grpo, "final_accuracy")["final_accuracy"]["mean"],
            f"the best GRPO configuration's final mean ({best(grpo, 'final_accuracy')['label']})",
        )
    for row in rows:
        if target is None:
            row["tokens_to_target"] = row["seconds_to_target"] = None
            continue
        c = row["mean_curve_tokens"]
        row["tokens_to_target"] = first_reach(c["x"], c["mean"], target)
        c = row["mean_curve_seconds"]
        row["seconds_to_target"] = first_reach(c["x"], c["mean"], target)
        row["seeds_reaching_target"] = sum(
            first_reach([p["tokens"] for p in r["curve_tokens"]], [p["accuracy"] for p in r["curve_tokens"]], target)
            is not None
            for (lab, _), r in results.items()
            if lab == row["label"]
        )
    ratios = {}
    if grpo and tree:
        g, t = best(grpo, "final_accuracy"), best(tree, "final_accuracy")
        ratios["best_treerpo_minus_best_grpo_final_accuracy"] = (
            t["final_accuracy"]["mean"] - g["final_accuracy"]["mean"]
        )
        g_auc, t_auc = best(grpo, "auc"), best(tree, "auc")
        if g_auc["auc"]["mean"] > 0:
            ratios["best_treerpo_over_best_grpo_auc"] = t_auc["auc"]["mean"] / g_auc["auc"]["mean"]
        for what in ("tokens", "seconds"):
            key = f"{what}_to_target"
            g_hits = [r[key] for r in grpo if r.get(key) is not None]
            t_hits = [r[key] for r in tree if r.get(key) is not None]
            if g_hits and t_hits and min(t_hits) > 0:
                ratios[f"best_grpo_over_best_treerpo_{key}"] = min(g_hits) / min(t_hits)
        if seconds is not None:
            g_s, t_s = best(grpo, "accuracy_at_seconds"), best(tree, "accuracy_at_seconds")
            ratios["best_treerpo_minus_best_grpo_accuracy_at_seconds"] = (
                t_s["accuracy_at_seconds"]["mean"] - g_s["accuracy_at_seconds"]["mean"]
            )
    return {
        "configs": rows,
        "target": target,
        "target_source": target_source if target is not None else None,
        "ratios": ratios,
        "best_final_accuracy": best(rows, "final_accuracy")["label"],
        "best_auc": best(rows, "auc")["label"],
    }


# ---- text and plots -----------------------------------------------------------------------------------
def _pm(stat: dict, fmt: str = "{:.3f}") -> str:
    if stat["mean"] is None:
        return "-"
    return fmt.format(stat["mean"]) + (f" ± {fmt.format(stat['std'])}" if stat["n"] > 1 else "")


def _tokens(x) -> str:
    if x is None:
        return "never"
    return f"{x / 1e6:.3g}M" if x >= 1e6 else f"{x / 1e3:.3g}k" if x >= 1e3 else f"{x:.0f}"


def markdown_table(summary: dict, tokens: int, seconds: float | None) -> str:
    target = summary["target"]
    cols = [
        "config",
        "n",
        f"accuracy at {_tokens(tokens)} tokens",
        "AUC / budget",
        "training s to budget",
        "steps to budget",
        "tokens/step",
        "start accuracy",
    ]
    if seconds is not None:
        cols += [f"accuracy at {seconds:g} s", "AUC / s budget"]
    if target is not None:
        cols += [f"tokens to {target:.3f}", f"seconds to {target:.3f}"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in summary["configs"]:
        cells = [
            f"`{r['label']}`",
            str(r["n"]),
            _pm(r["final_accuracy"]),
            _pm(r["auc"]),
            _pm(r["seconds_at_budget"], "{:.1f}"),
            _pm(r["steps_at_budget"], "{:.0f}"),
            _pm(r["tokens_per_step"], "{:,.0f}"),
            _pm(r["initial_accuracy"]),
        ]
        if seconds is not None:
            cells += [_pm(r["accuracy_at_seconds"]), _pm(r["auc_seconds"])]
        if target is not None:
            reached = f" ({r['seeds_reaching_target']}/{r['n']} seeds)" if r["n"] > 1 else ""
            cells += [
                _tokens(r["tokens_to_target"]) + reached,
                "never" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["ratios"]:
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.3g} |" for k, v in summary["ratios"].items()]
    return "\n".join(lines)


def plot_curves(summary: dict, out_dir: Path, title: str, seconds: float | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, name in (
        ("mean_curve_tokens", "generated tokens", "accuracy_vs_tokens"),
        (
            "mean_curve_seconds",
            "training seconds (evaluation excluded)" + ("" if seconds is not None else ", up to the token budget"),
            "accuracy_vs_seconds",
        ),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for row in summary["configs"]:
            c = row[key]
            (line,) = ax.plot(c["x"], c["mean"], marker="o", ms=3, label=f"{row['label']} (n={row['n']})")
            ax.fill_between(c["x"], c["min"], c["max"], alpha=0.18, color=line.get_color())
        if summary["target"] is not None:
            ax.axhline(summary["target"], color="grey", ls=":", lw=1, label=f"target {summary['target']:.3f}")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy\n(mean over seeds, band: min - max)")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def describe_machine(threads: int | None) -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{threads or 'torch default'} threads a run, torch {torch.__version__}"
    )


# ---- main ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        "--grid",
        nargs="+",
        default=[],
        metavar="CONFIG",
        help="[LABEL=]ALGO[:KEY=VALUE,...]; '|' between values expands a grid",
    )
    parser.add_argument("--config-file", default=None, help="YAML/JSON list of configurations")
    parser.add_argument("--common", default=None, help="KEY=VALUE,... applied to every configuration")
    parser.add_argument("--tokens", type=int, required=True, help="generated-token budget of every run")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="also a training-seconds budget: every run also passes it, accuracy read at it",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (all configs)")
    parser.add_argument(
        "--evals",
        type=int,
        default=10,
        help="without --eval-every: each config evaluates about every budget/N nominal tokens "
        "(at least this many evaluations within the budget)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="accuracy to reach (default: the best GRPO configuration's final mean)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of every run")
    parser.add_argument("--out", default="learning_runs", help="run folders, tables, plots (kept; reruns resume)")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds one run may take")
    parser.add_argument("--json", default=None)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.tokens < 1:
            raise ConfigStringError(f"--tokens must be >= 1, got {args.tokens}")
        common = parse_common(args.common)
        configs = [c for text in args.configs for c in parse_config(text, common)]
        if args.config_file:
            configs += load_config_file(args.config_file, common)
        if not configs:
            configs = parse_config("grpo", common) + parse_config("treerpo", common)
        labels = [c.label for c in configs]
        if len(set(labels)) != len(labels):
            raise ConfigStringError(f"configurations given twice: {sorted({x for x in labels if labels.count(x) > 1})}")
    except ConfigStringError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    evals_every = {}
    for c in configs:
        nominal = nominal_tokens_per_step(c.values)
        evals_every[c.label] = args.eval_every or max(1, math.floor(args.tokens / nominal / args.evals))
    from treerpo.config import make_config

    base = make_config(configs[0].values)
    model = base.model or "embedded tiny Qwen2 (treerpo/models/tiny_chain)"
    describe = (
        f"learning efficiency on {describe_machine(args.threads)}: model {model}, task {base.dataset} "
        f"(held-out greedy pass@1 on {base.eval_size} problems), seeds {args.seeds}, budget "
        f"{args.tokens:,} generated tokens"
        + (f" and {args.seconds:g} training seconds" if args.seconds else "")
        + " per run; configurations:\n"
        + "\n".join(
            f"  {c.label}: {c.values} ({nominal_tokens_per_step(c.values):,} nominal tokens/step, "
            f"eval every {evals_every[c.label]} steps)"
            for c in configs
        )
        + f"\n{INTERPOLATION_NOTE}."
    )
    print(describe, flush=True)
    results, started = {}, time.perf_counter()
    for seed in args.seeds:
        for c in configs:
            run_dir = run_dir_for(out, c, evals_every[c.label], seed)
            try:
                run, what = run_one(
                    c, seed, run_dir, evals_every[c.label], args.tokens, args.seconds, args.threads, args.timeout
                )
            except RuntimeError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            results[(c.label, seed)] = {
                **analyse_run(run, args.tokens, args.seconds),
                "dir": str(run_dir),
                "label": c.label,
                "seed": seed,
                "evals": run["evals"],
            }
            print(
                f"  {c.label} seed {seed}: {what}; accuracy at budget {results[(c.label, seed)]['final_accuracy']:.3f}",
                flush=True,
            )
    summary = summarize(configs, results, args.tokens, args.seconds, args.target)
    table = markdown_table(summary, args.tokens, args.seconds)
    header = (
        f"target {summary['target']:.3f}: {summary['target_source']}; tokens/seconds to target are read off "
        "the mean-over-seeds curve (linear between evaluations); 'never' = not within the budget"
        if summary["target"] is not None
        else "no target (no GRPO configuration and no --target)"
    )
    print(f"\n{header}; mean ± std over seeds (n)\n\n{table}")
    plots = plot_curves(
        summary,
        out,
        f"{model}, task {base.dataset}; budget {_tokens(args.tokens)} generated tokens"
        f"\n{describe_machine(args.threads)}",
        args.seconds,
    )
    (out / "tables.md").write_text(f"{describe}\n\n{header}\n\n{table}\n")
    print(
        f"\ntables: {out / 'tables.md'}; plots: "
        + ", ".join(str(p) for p in plots)
        + f"; {time.perf_counter() - started:.0f} s"
    )
    payload = {
        "description": describe,
        "machine": describe_machine(args.threads),
        "model": model,
        "task": base.dataset,
        "tokens_budget": args.tokens,
        "seconds_budget": args.seconds,
        "seeds": args.seeds,
        "threads": args.threads,
        "interpolation": INTERPOLATION_NOTE,
        "target": summary["target"],
        "target_source": summary["target_source"],
        "eval_every": evals_every,
        "configs": summary["configs"],
        "ratios": summary["ratios"],
        "best_final_accuracy": summary["best_final_accuracy"],
        "best_auc": summary["best_auc"],
        "runs": [dict(v) for v in results.values()],
        "out": str(out),
    }
    (out / "learning.json").write_text(json.dumps(payload, indent=1, default=str))
    write_json(args.json, json.loads(json.dumps(payload, default=str)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
