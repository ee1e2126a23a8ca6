"""Held-out accuracy against generated tokens of finished trainer runs, side by side: one panel a task, one line a
configuration (its seeds thin, their mean thick; the mean is taken on a common token grid, linear between
evaluations, up to the shortest seed's last evaluation).

    python benchmarks/plot_curves.py --out curves.png \
        --panel "embedded tiny model, synthetic chains" --run "TreeRPO (4,2,2)" runs/a/seed0 runs/a/seed1 \
        --panel "SmolLM2-135M, word problems" --run "TreeRPO (2,2,2)" out-smollm2-s0 out-smollm2-s1

A run folder is a ``python -m treerpo.train`` output folder (``metrics.jsonl``, ``summary.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import read_run


class _AddRun(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if not namespace.panels:
            parser.error("--run needs a --panel before it")
        label, *dirs = values
        if not dirs:
            parser.error(f"--run {label!r}: give at least one run folder after the label")
        namespace.panels[-1][1].append((label, [Path(d) for d in dirs]))


class _AddPanel(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.panels.append((values, []))


def curves(dirs: list[Path]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(generated tokens, accuracy) at every evaluation of each run, the step-0 evaluation included."""
    out = []
    for d in dirs:
        run = read_run(d)
        if run is None or not run["evals"]:
            raise SystemExit(f"{d}: no metrics.jsonl with held-out evaluations (is it a treerpo.train output folder?)")
        out.append(
            (
                np.array([e["tokens"] for e in run["evals"]], float),
                np.array([e["accuracy"] for e in run["evals"]], float),
            )
        )
    return out


def plot(panels, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels, strict=True):
        for i, (label, dirs) in enumerate(runs):
            color = f"C{i}"
            seeds = curves(dirs)
            for tokens, acc in seeds:
                ax.plot(tokens, acc, color=color, alpha=0.3, linewidth=0.8)
            grid = np.linspace(0, min(t[-1] for t, _ in seeds), 50)
            mean = np.mean([np.interp(grid, t, a) for t, a in seeds], axis=0)
            ax.plot(grid, mean, color=color, linewidth=2, label=f"{label} (mean of {len(seeds)} seeds)")
        ax.set_title(title)
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("held-out greedy accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(panels=[])
    parser.add_argument("--panel", action=_AddPanel, metavar="TITLE", help="start a panel")
    parser.add_argument(
        "--run",
        action=_AddRun,
        nargs="+",
        metavar="LABEL DIR",
        help="a configuration: its label, then its run folders (one a seed)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.panels or any(not runs for _, runs in args.panels):
        parser.error("give at least one --panel, each with at least one --run")
    plot(args.panels, args.out)
    for title, runs in args.panels:
        print(f"{title}: " + "; ".join(f"{label}: {len(dirs)} runs" for label, dirs in runs))
    print(f"plot written to {args.out}")


if __name__ == "__main__":
    main()
