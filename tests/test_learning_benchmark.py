"""benchmarks/learning.py: two tiny configurations run by the trainer to one generated-token budget, the curves
cut at it, the accuracy at the budget recomputed here from each run's metrics.jsonl; bad configurations refused
before any run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "learning.py"
BUDGET = 1500  # about 3-5 steps of either configuration (4 prompts a step)
CONFIGS = ["grpo:group_size=4", "treerpo:branching=2,2"]
COMMON = "prompts_per_step=4,eval_size=32,segment_tokens=18,max_new_tokens=36"


def _bench(tmp_path, *extra):
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--configs",
            *CONFIGS,
            "--common",
            COMMON,
            "--tokens",
            str(BUDGET),
            "--seeds",
            "0",
            "--eval-every",
            "1",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "runs"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def _accuracy_at_budget(run_dir: Path) -> float:
    """Independently of the benchmark: cumulative generated tokens per step from metrics.jsonl, the evaluations on
    either side of the budget (step 0 from summary.json), linear interpolation between them."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points, total = [(0, json.loads((run_dir / "summary.json").read_text())["initial_eval_accuracy"])], 0
    for r in records:
        total += r["tokens_generated"]
        if r.get("eval_accuracy") is not None:
            points.append((total, r["eval_accuracy"]))
    before = [p for p in points if p[0] <= BUDGET][-1]
    after = next(p for p in points if p[0] >= BUDGET)
    if after[0] == before[0]:
        return before[1]
    return before[1] + (after[1] - before[1]) * (BUDGET - before[0]) / (after[0] - before[0])


@pytest.mark.slow
def test_two_configs_cut_at_the_token_budget(tmp_path):
    proc = _bench(tmp_path, "--json", str(tmp_path / "learning.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "learning.json").read_text())
    assert [c["label"] for c in data["configs"]] == CONFIGS
    assert data["tokens_budget"] == BUDGET and "interpolation" in data["interpolation"]
    assert len(data["runs"]) == 2
    for run in data["runs"]:
        curve = run["curve_tokens"]
        assert all(p["tokens"] <= BUDGET for p in curve) and curve[-1]["tokens"] == BUDGET
        assert curve[0]["tokens"] == 0 and len(curve) >= 3  # the step-0 evaluation and at least one inside
        assert 0.0 <= run["final_accuracy"] <= 1.0
        assert run["final_accuracy"] == pytest.approx(_accuracy_at_budget(Path(run["dir"])), abs=1e-12)
        assert run["final_accuracy"] == curve[-1]["accuracy"]
        assert 0.0 <= run["auc"] <= 1.0 and run["seconds_at_budget"] > 0
    for config in data["configs"]:
        assert config["n"] == 1 and config["mean_curve_tokens"]["x"][-1] == BUDGET
        assert max(config["mean_curve_tokens"]["x"]) <= BUDGET
    assert isinstance(data["ratios"], dict) and "best_treerpo_minus_best_grpo_final_accuracy" in data["ratios"]
    grpo = data["configs"][0]["final_accuracy"]["mean"]
    assert data["target"] == pytest.approx(grpo)  # the default target: the best GRPO configuration's final mean
    assert data["configs"][0]["tokens_to_target"] is not None  # GRPO reaches its own final accuracy by the budget
    assert "| config |" in proc.stdout and "interpolation" in proc.stdout
    assert (tmp_path / "runs" / "accuracy_vs_tokens.png").stat().st_size > 0
    assert (tmp_path / "runs" / "accuracy_vs_seconds.png").stat().st_size > 0
    # a rerun finds both runs finished in --out and runs nothing
    again = _bench(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("found in --out") == 2


def test_a_bad_config_is_refused_before_any_run(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--configs",
            "grpo:group_size=4",
            "treerpo:branchng=2,2",
            "--tokens",
            "100",
            "--out",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "config 'treerpo:branchng=2,2'" in proc.stderr and "unknown config key" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before any run started


@pytest.mark.parametrize(
    "bad, words",
    [
        ("treerpo:segment_tokens=4.5", ["segment_tokens", "not a valid int"]),
        ("grpo:seed=3", ["seed", "--seeds"]),
        ("ppo:group_size=4", ["ppo", "treerpo or grpo"]),
        ("grpo:group_size=4,group_size=8", ["group_size", "twice"]),
    ],
)
def test_bad_config_messages(tmp_path, capsys, bad, words):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from learning import main

    assert main(["--configs", "grpo:group_size=4", bad, "--tokens", "100", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"config {bad!r}" in err and all(w in err for w in words), err
    assert not (tmp_path / "runs").exists()


def test_config_strings_and_the_grid_shorthand():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from learning import nominal_tokens_per_step, parse_config

    (tree,) = parse_config("treerpo:branching=2,2,2,2,segment_tokens=8")
    assert tree.overrides == {"branching": [2, 2, 2, 2], "segment_tokens": 8}
    assert nominal_tokens_per_step({**tree.values, "prompts_per_step": 1}) == 8 * (2 + 4 + 8 + 16)
    grid = parse_config("wide=treerpo:branching=4,2,2|2,2,2,2,segment_tokens=8|12", {"prompts_per_step": "4"})
    assert len(grid) == 4 and len({c.label for c in grid}) == 4 and all(c.label.startswith("wide[") for c in grid)
    assert all(c.overrides["prompts_per_step"] == 4 for c in grid)
    (grpo,) = parse_config("grpo:group_size=8")
    assert nominal_tokens_per_step({**grpo.values, "prompts_per_step": 2}) == 2 * 8 * 36


def test_cut_area_and_crossing_by_hand():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from learning import area, cut_curve, first_reach, mean_curve, seconds_at_tokens

    evals = [
        {"step": 0, "tokens": 0, "seconds": 0.0, "accuracy": 0.2},
        {"step": 2, "tokens": 100, "seconds": 2.0, "accuracy": 0.4},
        {"step": 4, "tokens": 200, "seconds": 4.0, "accuracy": 0.8},
    ]
    curve = cut_curve(evals, "tokens", 150)
    assert [p["tokens"] for p in curve] == [0, 100, 150]
    assert curve[-1]["accuracy"] == pytest.approx(0.6) and curve[-1]["seconds"] == pytest.approx(3.0)
    assert cut_curve(evals, "tokens", 100) == evals[:2]  # an evaluation exactly at the budget: nothing added
    # (0.2 + 0.4) / 2 * 100 + (0.4 + 0.6) / 2 * 50 = 55, over a budget of 150
    assert area(curve, "tokens", 150) == pytest.approx(55 / 150)
    assert first_reach([0, 100, 150], [0.2, 0.4, 0.6], 0.5) == pytest.approx(125)
    assert first_reach([0, 100, 150], [0.2, 0.4, 0.6], 0.7) is None
    run = {"steps": [{"step": 1, "tokens": 60, "seconds": 1.0}, {"step": 2, "tokens": 100, "seconds": 3.0}]}
    assert seconds_at_tokens(run, 80) == pytest.approx(2.0)
    other = [{"tokens": 0, "accuracy": 0.4}, {"tokens": 150, "accuracy": 0.4}]
    mean = mean_curve([curve, other], "tokens")
    assert mean["x"] == [0, 100, 150] and mean["mean"] == pytest.approx([0.3, 0.4, 0.5])
    assert mean["min"] == pytest.approx([0.2, 0.4, 0.4]) and mean["max"] == pytest.approx([0.4, 0.4, 0.6])
