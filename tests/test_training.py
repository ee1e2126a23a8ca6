"""The trainer end to end on the embedded model: outputs, exact resume, both algorithms through one path."""

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import char_model_folder
from treerpo.config import make_config
from treerpo.training.trainer import Trainer

SMALL = dict(
    prompts_per_step=4,
    branching=[2, 2, 2],
    segment_tokens=12,
    group_size=4,
    eval_size=16,
    eval_every=2,
    save_every=2,
    kl_coef=0.02,
    ppo_epochs=2,
    minibatches=2,
    micro_batch_tokens=128,
)


def run(out, **overrides):
    trainer = Trainer(make_config({**SMALL, "output_dir": str(out), **overrides}), log=lambda *a: None)
    try:
        return trainer.train()
    finally:
        trainer.close()


def records(out):
    """Metrics without wall-clock timings."""
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in lines]


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(straight, max_steps=4)
    run(stopped, max_steps=2)
    (stopped / ".checkpoint-3.tmp").mkdir()  # debris of a crash while writing: must be ignored
    summary = run(stopped, max_steps=4, resume=True)
    a, b = records(straight), records(stopped)
    assert len(a) == len(b) == 4
    assert a == b
    assert sum(r["tokens_trained"] for r in a) > 0, "the run must actually train for the comparison to mean anything"
    wa = load_file(straight / "checkpoint-4" / "model.safetensors")
    wb = load_file(stopped / "checkpoint-4" / "model.safetensors")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert summary["tokens_generated"] == sum(r["tokens_generated"] for r in a)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["treerpo", "grpo"])
def test_outputs_of_a_run(tmp_path, algo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = run(tmp_path, algo=algo, max_steps=2, ppo_epochs=1, minibatches=1)
    for key in (
        "algo",
        "steps",
        "initial_eval_accuracy",
        "final_eval_accuracy",
        "wall_time_s",
        "tokens_generated",
        "tokens_trained",
    ):
        assert key in summary
    assert summary["algo"] == algo
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    lines = records(tmp_path)
    assert [r["step"] for r in lines] == [1, 2]
    for key in ("reward_mean", "accuracy", "kept_groups", "tokens_generated", "tokens_trained"):
        assert key in lines[0]
    assert (tmp_path / "training.png").stat().st_size > 1000
    ckpt = tmp_path / (tmp_path / "latest").read_text()
    AutoModelForCausalLM.from_pretrained(ckpt)  # Hugging Face format, loads as is
    assert AutoTokenizer.from_pretrained(ckpt)("1+2=")["input_ids"]
    if algo == "grpo":
        assert lines[0]["leaves"] == 4 * 4 and lines[0]["groups"] == 4


def test_resume_refuses_changed_options(tmp_path):
    run(tmp_path, max_steps=1, eval_every=0)
    with pytest.raises(ValueError, match="options differ"):
        Trainer(make_config({**SMALL, "output_dir": str(tmp_path), "max_steps": 2, "resume": True, "lr": 1.0}))


def test_math_file_dataset_runs_through_the_trainer(tmp_path):
    """A gsm8k-format file trains through the math-verify reward (the model is not expected to score)."""
    data = tmp_path / "gsm.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{i}+{i}=", "answer": f"so #### {2 * i}"}) + "\n" for i in range(12))
    )
    summary = run(
        tmp_path / "out",
        model=str(char_model_folder(tmp_path / "model")),
        dataset=str(data),
        eval_size=4,
        max_steps=1,
        max_prompt_tokens=32,
        truncate_prompts=True,
        ppo_epochs=1,
        minibatches=1,
    )
    assert summary["steps"] == 1 and summary["tokens_generated"] > 0
    assert 0.0 <= summary["final_eval_accuracy"] <= 1.0


def test_malformed_dataset_line_is_reported(tmp_path):
    from treerpo.data.math_datasets import DatasetFormatError

    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1", "answer": "#### 2"}\n{"question": \n')
    with pytest.raises(DatasetFormatError, match=r"bad.jsonl.*line 2"):
        run(tmp_path / "out", dataset=str(data), eval_size=1, max_steps=1)


def test_fresh_run_into_a_used_output_dir_is_refused(tmp_path):
    run(tmp_path, max_steps=1, eval_every=0)
    with pytest.raises(ValueError, match="earlier run; continue it with --resume"):
        Trainer(make_config({**SMALL, "output_dir": str(tmp_path), "max_steps": 2}))


def test_resume_error_names_the_changed_option(tmp_path):
    run(tmp_path, max_steps=1, eval_every=0)
    with pytest.raises(ValueError, match=r"lr=1\.0 \(was 5e-05\)"):
        Trainer(make_config({**SMALL, "output_dir": str(tmp_path), "max_steps": 2, "resume": True, "lr": 1.0}))


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    from treerpo.runtime.checkpoint import checkpoint_steps, prune_checkpoints

    for step in (50, 150, 200):
        (tmp_path / f"checkpoint-{step}").mkdir()
    prune_checkpoints(tmp_path, keep=2, newest=50)
    assert checkpoint_steps(tmp_path) == [50, 200]
