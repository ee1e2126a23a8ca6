"""Non-finite steps, resume option checks, metrics repair and PPO minibatches on the embedded model."""

import json

import numpy as np
import pytest
import torch

import treerpo.training.batch as batch_module
from helpers import char_model_folder
from treerpo.config import make_config
from treerpo.runtime.finite_guard import NonFiniteError
from treerpo.runtime.resume import ResumeMismatchError
from treerpo.training.minibatch_plan import micro_batches, minibatch_indices
from treerpo.training.trainer import Trainer
from treerpo.trees.token_weights import loss_token_count

SMALL = dict(
    prompts_per_step=4,
    branching=[2, 2, 2],
    segment_tokens=12,
    eval_size=8,
    eval_every=0,
    save_every=1,
    kl_coef=0.02,
    threads=1,
    kv_pool_tokens=4096,
)


def make_trainer(out, **overrides):
    return Trainer(make_config({**SMALL, "output_dir": str(out), **overrides}), log=lambda *a: None)


def run(out, **overrides):
    t = make_trainer(out, **overrides)
    try:
        return t.train()
    finally:
        t.close()


def strict_json_lines(path):
    """Every line parses as strict JSON (no NaN/Infinity constants)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_nonfinite_step_is_not_applied_and_the_run_stops_after_n_in_a_row(tmp_path, monkeypatch):
    t = make_trainer(tmp_path, max_steps=5, max_nonfinite_steps=2, tau=0.0)
    try:
        t.initial_eval = 0.0
        t.train_step(0)  # one good step so AdamW has state to protect
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        opt_before = [s["exp_avg"].clone() for s in t.optimizer.state.values()]
        real_loss = batch_module.policy_loss  # the Trainer computes its loss through batch_loss

        def nan_loss(*args, **kwargs):
            loss, stats = real_loss(*args, **kwargs)
            return loss * float("nan"), stats

        monkeypatch.setattr(batch_module, "policy_loss", nan_loss)
        record = t.train_step(1)
        assert record["skipped_updates"] == 1 and record["optimizer_steps"] == 0
        assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items()), "weights changed"
        assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(opt_before, t.optimizer.state.values(), strict=True))
        t.start_step = 1
        with pytest.raises(NonFiniteError, match=r"not finite 2 steps in a row \(max_nonfinite_steps=2\)"):
            t.train()
    finally:
        t.close()
    records = strict_json_lines(tmp_path / "metrics.jsonl")
    assert [r["nonfinite"] for r in records] == [True, True] and records[0]["loss"] is None
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["nonfinite_streak"] == 1  # the step-3 checkpoint was never written


@pytest.mark.slow
def test_huge_learning_rate_never_checkpoints_nonfinite_weights(tmp_path):
    """The issue's case: the default tree and batch with lr 1e3 (the old code checkpointed NaN weights)."""
    try:
        run(tmp_path, lr=1e3, max_steps=6, prompts_per_step=32, branching=[4, 2, 2], eval_size=16)
    except NonFiniteError:
        pass  # stopping is fine; what it leaves behind is checked below
    strict_json_lines(tmp_path / "metrics.jsonl")
    from safetensors.torch import load_file

    for checkpoint in tmp_path.glob("checkpoint-*"):
        assert all(torch.isfinite(w).all() for w in load_file(checkpoint / "model.safetensors").values())


@pytest.mark.slow
def test_resume_resolves_paths_and_allows_evaluation_options(tmp_path, monkeypatch):
    """Relative model, data and output paths written differently (and an output folder moved) are one run."""
    monkeypatch.chdir(tmp_path)
    char_model_folder(tmp_path / "m")
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"question": f"{i}+1=", "answer": f"#### {i + 1}"}) + "\n" for i in range(12))
    )
    paths = dict(model="m", dataset="d.jsonl", eval_size=4, max_prompt_tokens=64, truncate_prompts=True)
    run("out", max_steps=1, **paths)
    run(
        "./out/",
        max_steps=2,
        resume=True,
        eval_every=1,
        eval_samples=2,
        eval_temperature=0.5,
        **{**paths, "model": "./m/", "dataset": str(tmp_path / "d.jsonl")},
    )
    (tmp_path / "out").rename(tmp_path / "moved")
    run(str(tmp_path / "moved"), max_steps=3, resume=True, **paths)
    assert [r["step"] for r in strict_json_lines(tmp_path / "moved" / "metrics.jsonl")] == [1, 2, 3]
    with pytest.raises(ResumeMismatchError, match=r"lr=0.001 \(was 5e-05\)"):
        run("moved", max_steps=4, resume=True, lr=1e-3, **paths)


@pytest.mark.slow
def test_truncated_last_metrics_line_is_repaired_with_a_notice(tmp_path):
    run(tmp_path, max_steps=2)
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 3, "rew')  # a crash while writing step 3
    notices = []
    t = Trainer(make_config({**SMALL, "output_dir": str(tmp_path), "max_steps": 3, "resume": True}), log=notices.append)
    try:
        t.train()
    finally:
        t.close()
    assert any("cut short" in n for n in notices)
    assert [r["step"] for r in strict_json_lines(path)] == [1, 2, 3]


def _trees(seed=0, count=8):
    from helpers import random_tree

    rng = np.random.default_rng(seed)
    return [random_tree(rng, 6) for _ in range(count)]


@pytest.mark.parametrize("minibatches", [1, 2, 4])
def test_minibatches_are_whole_trees_whatever_the_token_budget(minibatches):
    trees = _trees()
    for budget in (16, 64, 4096):
        np.random.seed(0)
        groups = [[trees[i] for i in g] for g in minibatch_indices([loss_token_count(t) for t in trees], minibatches)]
        assert len(groups) == minibatches
        assert sorted(id(t) for g in groups for t in g) == sorted(id(t) for t in trees)
        for group in groups:
            assert sum(len(m) for m in micro_batches(group, budget)) == len(group)


@pytest.mark.slow
def test_optimizer_steps_per_epoch_do_not_depend_on_micro_batch_tokens(tmp_path):
    weights, steps = [], []
    for budget in (64, 16384):
        t = make_trainer(
            tmp_path / str(budget),
            max_steps=1,
            minibatches=2,
            ppo_epochs=2,
            tau=0.0,
            prompts_per_step=8,
            micro_batch_tokens=budget,
        )
        try:
            t.initial_eval = 0.0
            record = t.train_step(0)
            steps.append(record["optimizer_steps"])
            weights.append({k: v.clone() for k, v in t.model.state_dict().items()})
        finally:
            t.close()
    assert steps == [4, 4]
    # the same minibatches, summed in another order: Adam's normalised step (lr 5e-5 an element) amplifies the
    # last-bit differences of near-zero gradients (one such element can move by up to a step the other way), so:
    # all but 0.1% of the elements within a fraction of one step, and none further than the 4 steps can take
    diff = torch.cat([(weights[0][k] - weights[1][k]).abs().reshape(-1) for k in weights[0]])
    assert (diff > 2e-5).float().mean() < 1e-3, f"{int((diff > 2e-5).sum())} of {len(diff)} elements differ"
    assert diff.max() <= 4 * 2 * 5e-5, float(diff.max())


def test_signal_during_the_last_step_completes_the_run(tmp_path):
    """The step finishes, the final checkpoint and summary are written: the run is done, not interrupted."""
    import signal

    from treerpo.runtime.graceful_stop import GracefulStop

    t = make_trainer(tmp_path, max_steps=1)
    stop, real_step = GracefulStop(), t.train_step

    def step_then_signal(step):
        record = real_step(step)
        stop.requested = signal.SIGINT
        return record

    t.train_step = step_then_signal
    try:
        summary = t._train(stop)
    finally:
        t.close()
    assert summary["steps"] == 1 and (tmp_path / "summary.json").exists() and (tmp_path / "checkpoint-1").is_dir()
