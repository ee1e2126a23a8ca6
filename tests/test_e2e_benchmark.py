"""benchmarks/e2e.py: the five systems run end to end; the report's arithmetic against hand-computed cases."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from e2e_presets import get_preset  # noqa: E402
from e2e_report import first_reach, summarize  # noqa: E402
from e2e_systems import hash_reward, trl_config  # noqa: E402


def _run(system, seed, step_s, evals, tokens=100):
    steps = [
        {
            "step_s": t,
            "rollout_s": t / 2,
            "scoring_s": 0.0,
            "logprobs_s": t / 4,
            "training_s": t / 4,
            "tokens_generated": tokens,
            "tokens_trained": tokens,
            "reward_mean": 0.5,
            "response_tokens_mean": 10,
        }
        for t in step_s
    ]
    return {
        "system": system,
        "seed": seed,
        "steps": steps,
        "peak_memory_MiB": 100.0,
        "evals": [{"step": i, "wall_s": w, "tokens_generated": k, "accuracy": a} for i, (w, k, a) in enumerate(evals)],
    }


def test_summary_ratios_and_crossings_by_hand():
    runs = [
        # per-step medians after the warm-up step: trl 3.0, grpo 1.5, treerpo 0.5
        _run("trl", 0, [9.0, 3.0, 3.0], [(0, 0, 0.3), (6, 100, 0.4), (9, 150, 0.5), (12, 200, 0.6), (15, 300, 0.7)]),
        _run("grpo", 0, [5.0, 1.5, 1.5], [(0, 0, 0.3), (6.5, 200, 0.55), (8, 300, 0.58)]),
        _run(
            "treerpo",
            0,
            [1.0, 0.5, 0.5],
            [(0, 0, 0.3), (0.5, 50, 0.65), (1, 100, 0.5), (1.5, 150, 0.6), (2, 200, 0.62)],
        ),
    ]
    summary = summarize(runs)
    ratios = summary["ratios"]
    assert ratios["grpo_step_speedup_vs_trl"] == pytest.approx(2.0)
    assert ratios["treerpo_step_speedup_vs_trl"] == pytest.approx(6.0)
    assert ratios["treerpo_step_speedup_vs_grpo"] == pytest.approx(3.0)
    # TRL's final accuracy: the mean of its last three evaluations, 0.6, after 15 s and 300 tokens. TreeRPO's
    # lucky 0.65 at step 1 is followed by 0.5 (mean 0.575): it holds 0.6 from step 3 (0.6 and 0.62)
    (row,) = summary["crossings"]["treerpo"]
    assert row["trl_final_accuracy"] == pytest.approx(0.6)
    assert (row["reached"], row["step"], row["wall_s"], row["tokens"]) == (True, 3, 1.5, 150)
    assert ratios["treerpo_wall_clock_to_trl_final_accuracy_speedup"] == pytest.approx(15 / 1.5)
    assert ratios["treerpo_tokens_to_trl_final_accuracy_saving"] == pytest.approx(300 / 150)
    assert not summary["crossings"]["grpo"][0]["reached"]  # 0.55 and 0.58 never average 0.6
    assert summary["systems"]["trl"]["step_s"]["mean"] == pytest.approx(3.0)


def test_trl_integration_ratios_by_hand():
    runs = [
        _run("trl", 0, [9.0, 3.0, 3.0], [(0, 0, 0.3), (9, 150, 0.5)]),
        _run("trl_rollout", 0, [5.0, 2.0, 2.0], [(0, 0, 0.3), (5, 150, 0.5)]),
        _run("trl_treerpo", 0, [2.0, 1.0, 1.0, 1.0], [(0, 0, 0.3), (5, 150, 0.5)]),
    ]
    ratios = summarize(runs)["ratios"]
    assert ratios["trl_rollout_step_speedup_vs_trl"] == pytest.approx(1.5)
    assert ratios["trl_rollout_rollout_speedup_vs_trl"] == pytest.approx(1.5)  # rollout = step / 2 in _run
    assert ratios["trl_treerpo_step_speedup_vs_trl"] == pytest.approx(3.0)
    assert ratios["trl_treerpo_wall_clock_speedup_vs_trl"] == pytest.approx(15 / 5)


def test_no_crossing_ratio_when_a_seed_never_reaches_the_target():
    runs = [_run("trl", s, [2.0, 2.0], [(0, 0, 0.3), (4, 200, 0.7)]) for s in (0, 1)]
    runs += [
        _run("treerpo", 0, [1.0, 1.0], [(0, 0, 0.3), (2, 100, 0.8)]),
        _run("treerpo", 1, [1.0, 1.0], [(0, 0, 0.3), (2, 100, 0.6)]),
    ]
    summary = summarize(runs)
    assert [r["reached"] for r in summary["crossings"]["treerpo"]] == [True, False]
    assert "treerpo_wall_clock_to_trl_final_accuracy_speedup" not in summary["ratios"]
    assert first_reach(runs[2], 0.8)["step"] == 1 and first_reach(runs[3], 0.8) is None


def test_budget_modes_and_trl_batching():
    tiny = get_preset("tiny")
    assert tiny.group_size("leaves") == 16  # tree (4, 2, 2)
    assert tiny.group_size("tokens") == round(12 * (4 + 8 + 16) / 36)
    config = trl_config(tiny, 16, seed=0, output_dir="/tmp/unused")
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 32 * 16
    assert config.steps_per_generation == config.gradient_accumulation_steps  # one rollout per optimizer step
    big = get_preset("qwen1.5b")
    config = trl_config(big, 16, seed=0, output_dir="/tmp/unused")
    assert config.gradient_accumulation_steps > 1
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 16 * 16
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_hash_reward_is_deterministic_and_varies():
    texts = [f"{i}+{i}" for i in range(64)]
    scores = hash_reward(texts, [""] * 64)
    assert scores == hash_reward(texts, [""] * 64)
    assert set(scores) == {0.0, 1.0}


def test_e2e_runs_all_five_systems(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "e2e.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "e2e.py"),
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--seeds",
            "0",
            "--out",
            str(tmp_path / "runs"),
            "--json",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    runs = {r["system"]: r for r in result["runs"]}
    assert set(runs) == {"treerpo", "grpo", "trl", "trl_rollout", "trl_treerpo"}
    for run in runs.values():
        steps = 3 if run["system"] in ("treerpo", "trl_treerpo") else 2  # the tree generates fewer tokens a step
        assert run["planned_steps"] == len(run["steps"]) == steps
        assert [e["step"] for e in run["evals"]] == [0, steps]
        assert all(s["tokens_generated"] > 0 and s["rollout_s"] > 0 for s in run["steps"])
    assert all(runs[s]["same_prompts_as_treerpo"] for s in ("trl", "trl_rollout", "trl_treerpo"))
    # GRPO with G = 16 and TRL sample the same number of answers of the same length limit
    assert runs["grpo"]["group_size"] == runs["trl"]["group_size"] == runs["trl_rollout"]["group_size"] == 16
    for key in (
        "grpo_step_speedup_vs_trl",
        "treerpo_step_speedup_vs_trl",
        "trl_rollout_step_speedup_vs_trl",
        "trl_treerpo_step_speedup_vs_trl",
    ):
        assert result["ratios"][key] > 0
    for png in ("accuracy_vs_wallclock.png", "accuracy_vs_tokens.png", "step_breakdown.png"):
        assert (tmp_path / "runs" / png).stat().st_size > 0


def test_run_lengths_equalise_the_generated_token_budget():
    tiny = get_preset("tiny", steps=100)
    # leaves: GRPO 16 x 36 = 576 tokens a prompt, the tree 12 x (4 + 8 + 16) = 336
    assert tiny.steps_for("grpo", "leaves") == tiny.steps_for("trl", "leaves") == 100
    assert tiny.steps_for("treerpo", "leaves") == round(100 * 576 / 336)
    # tokens: GRPO 9 x 36 = 324 tokens a prompt
    assert tiny.steps_for("treerpo", "tokens") == round(100 * 324 / 336)


def test_trl_with_gradient_accumulation_records_one_step_per_rollout():
    """The qwen1.5b preset's TRL layout (several forwards per optimizer step), at toy size, in process."""
    pytest.importorskip("trl")
    from dataclasses import replace

    from e2e_systems import run_trl

    preset = replace(
        get_preset("tiny"), steps=2, prompts_per_step=4, eval_size=8, eval_every=0, trl_per_device_batch=16
    )
    run = run_trl(preset, "trl", seed=0, budget="leaves", log=lambda message: None)
    assert run["trl_config"] == {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 4}
    assert len(run["steps"]) == 2 and [e["step"] for e in run["evals"]] == [0, 2]
    for step in run["steps"]:  # 4 prompts x 16 answers of 1 to 36 tokens, counted once per rollout
        assert 4 * 16 <= step["tokens_generated"] <= 4 * 16 * 36
        assert step["training_s"] > 0 and step["rollout_s"] > 0
    assert run["same_prompts_as_treerpo"]
