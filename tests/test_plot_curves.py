"""benchmarks/plot_curves.py: accuracy against cumulative generated tokens, read from trainer output folders."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plot_curves


def fake_run(folder: Path, initial: float, steps: list[tuple[int, float | None]]) -> Path:
    folder.mkdir(parents=True)
    lines = [
        {"step": i + 1, "tokens_generated": t, "step_s": 1.0, **({} if a is None else {"eval_accuracy": a})}
        for i, (t, a) in enumerate(steps)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "summary.json").write_text(json.dumps({"steps": len(steps), "initial_eval_accuracy": initial}))
    return folder


def test_curves_are_cumulative_tokens_at_each_evaluation(tmp_path):
    run = fake_run(tmp_path / "a", 0.25, [(100, None), (150, 0.5), (120, None), (130, 0.75)])
    ((tokens, acc),) = plot_curves.curves([run])
    assert tokens.tolist() == [0, 250, 500]
    assert acc.tolist() == [0.25, 0.5, 0.75]


def test_the_plot_is_written_and_bad_arguments_are_refused(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0.2, [(100, 0.4), (100, 0.5)])
    b = fake_run(tmp_path / "b", 0.2, [(80, 0.3), (80, 0.6)])
    out = tmp_path / "c.png"
    plot_curves.main(["--out", str(out), "--panel", "task", "--run", "algo", str(a), str(b)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "algo: 2 runs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plot_curves.main(["--out", str(out), "--run", "algo", str(a)])
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot_curves.main(["--out", str(out), "--panel", "t", "--run", "x", str(tmp_path)])
