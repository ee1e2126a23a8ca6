"""Per-step metrics (``metrics.jsonl``) and the reward / held-out accuracy plot."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        """On resume, lines past ``resume_step`` (written after the checkpoint) are dropped."""
        self.path = Path(path)
        self.records: list[dict] = []
        if resume_step and self.path.exists():
            self.records = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def plot_metrics(records: list[dict], path: Path, title: str, initial_eval: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["reward_mean"] for r in records], label="train reward (mean over leaves)", alpha=0.7)
    evals = [(0, initial_eval)] if initial_eval is not None else []
    evals += [(r["step"], r["eval_accuracy"]) for r in records if r.get("eval_accuracy") is not None]
    if evals:
        ax.plot(*zip(*evals), marker="o", label="held-out accuracy")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
