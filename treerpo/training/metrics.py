"""Per-step metrics (``metrics.jsonl``) and the reward / held-out accuracy plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from treerpo.runtime.checkpoint import write_text_atomic


class MetricsLogError(ValueError):
    pass


def finite_or_none(value):
    """JSON has no NaN or Infinity: a non-finite number is logged as null (the record says why elsewhere)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json_line(record: dict) -> str:
    return json.dumps({k: finite_or_none(v) for k, v in record.items()}, allow_nan=False) + "\n"


class MetricsLog:
    """``metrics.jsonl``: one valid JSON object a line, whatever the step computed or how the last run ended."""

    def __init__(self, path: Path, resume_step: int = 0, log=print):
        """On resume, lines past ``resume_step`` (written after the checkpoint) are dropped and a last line
        truncated by a crash is repaired; the file is rewritten atomically."""
        self.path = Path(path)
        self.records: list[dict] = []
        if resume_step and self.path.exists():
            self.records = [r for r in self._read(log) if r["step"] <= resume_step]
        write_text_atomic(self.path, "".join(map(to_json_line, self.records)))

    def _read(self, log) -> list[dict]:
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise MetricsLogError(
                        f"{self.path} line {number} is not valid JSON; repair or delete that line to resume"
                    ) from None
                log(f"resume: the last line of {self.path} was cut short (a crash while writing it); dropped it")
        return records

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(to_json_line(record))


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
        ax.plot(*zip(*evals, strict=True), marker="o", label="held-out accuracy")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
