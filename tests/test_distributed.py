"""Data-parallel training under torchrun (2 CPU processes, gloo) against one process on the same global batch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from treerpo.config import ConfigError, make_config
from treerpo.runtime.distributed import World
from treerpo.training.seeding import seed_everything, step_seed
from treerpo.training.trainer import Trainer

HERE = Path(__file__).parent
SMALL = dict(
    prompts_per_step=4,
    branching=[2, 2, 2],
    segment_tokens=12,
    eval_size=8,
    eval_every=0,
    save_every=1,
    kl_coef=0.02,
    ppo_epochs=1,
    minibatches=2,
    micro_batch_tokens=64,
    threads=1,
)
# exact counts: any difference means different trees, minibatches or padding
EXACT = (
    "step",
    "leaves",
    "groups",
    "kept_groups",
    "tokens_generated",
    "tokens_trained",
    "tokens_forward",
    "optimizer_steps",
    "skipped_updates",
    "reward_mean",
    "accuracy",
    "response_tokens_mean",
    "eval_accuracy",
    "nonfinite",
)


def flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        out.append("--" + key.replace("_", "-"))
        out.extend(str(v) for v in value) if isinstance(value, list) else out.append(str(value))
    return out


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}


def torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def train(out: Path, nproc: int | None, timeout: float = 300, **options) -> subprocess.CompletedProcess:
    """``python -m treerpo.train`` in one process (nproc None) or under torchrun."""
    args = flags({**SMALL, "output_dir": str(out), **options})
    command = (
        [sys.executable, "-m", "treerpo.train", *args]
        if nproc is None
        else torchrun(["-m", "treerpo.train", *args], nproc)
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for key in EXACT:
            assert ra.get(key) == rb.get(key), (ra["step"], key, ra.get(key), rb.get(key))
        for key in ("loss", "clip_fraction", "ratio_mean", "kl", "grad_norm"):  # sums in another order
            assert math.isclose(ra[key], rb[key], rel_tol=1e-4, abs_tol=1e-7), (ra["step"], key, ra[key], rb[key])


def assert_close_weights(a: dict, b: dict, atol: float = 1e-5, steps: int = 8, lr: float = 5e-5) -> None:
    """Within ``atol``, but for a few elements whose true gradient is ~0 (a key bias: softmax ignores it), where
    AdamW's normalised step turns reduction-order noise into up to ``lr`` a step either way: those may be off by
    at most 2 x lr x ``steps``, and must stay under 0.1% of the elements."""
    assert a.keys() == b.keys()
    diff = {name: (a[name] - b[name]).abs() for name in a}
    loose = sum(int((d > atol).sum()) for d in diff.values())
    assert loose <= 1e-3 * sum(d.numel() for d in diff.values()), {
        n: float(d.max()) for n, d in diff.items() if float(d.max()) > atol
    }
    for name, d in diff.items():
        assert float(d.max()) <= 2 * lr * steps, (name, float(d.max()))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    train(out, None, max_steps=2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, extra",
    [("auto", {}), ("fsdp", {}), ("ddp", {"gradient_checkpointing": True}), ("fsdp", {"gradient_checkpointing": True})],
    ids=["torchrun-default-ddp", "fsdp", "ddp-checkpointing", "fsdp-checkpointing"],
)
def test_two_ranks_equal_one_process(tmp_path, one_process_run, mode, extra):
    """Same global batch: the same trees, minibatches, counts and metrics; the weights within 1e-5."""
    out = tmp_path / "run"
    done = train(out, 2, max_steps=2, **({} if mode == "auto" else {"parallel": mode}), **extra)
    source = " (chosen for the torchrun launch of 2 processes)" if mode == "auto" else ""
    assert done.stdout.startswith(f"data parallel: {'ddp' if mode == 'auto' else mode} on 2 ranks{source}\n")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["parallel"]) == (2, "ddp" if mode == "auto" else mode)
    one, two = records(one_process_run), records(out)
    assert sum(r["tokens_trained"] for r in one) > 0 and sum(r["optimizer_steps"] for r in one) >= 3
    assert_same_metrics(one, two)
    exported = weights(out / "checkpoint-2")
    assert_close_weights(weights(one_process_run / "checkpoint-2"), exported)
    assert not any(
        torch.equal(exported[k], v)
        for k, v in weights(HERE.parent / "treerpo" / "models" / "tiny_chain").items()
        if "layers.0.mlp" in k
    ), "the run must move the weights for the comparison to mean anything"
    if mode == "fsdp":  # the Hugging Face export loads and equals the DCP state it was gathered from
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        from transformers import AutoModelForCausalLM

        dcp_to_torch_save(out / "checkpoint-2" / "dcp", tmp_path / "state.pt")
        dcp_model = {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "state.pt")["model"].items()}
        loaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2").state_dict()
        for name, tensor in loaded.items():
            assert torch.equal(tensor, dcp_model[name]), name


def dcp_weights(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The model state a DDP/FSDP2 checkpoint resumes from (a half-precision run's fp32 masters), by HF name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "dcp", scratch)
    return {k.removeprefix("model."): v for k, v in torch.load(scratch, weights_only=False)["model"].items()}


def one_process_masters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A one-process half-precision checkpoint's fp32 masters (kept by trainable-parameter index), by HF name."""
    from treerpo.models.tiny import load_model_and_tokenizer

    names = [n for n, _ in load_model_and_tokenizer(None, dtype=torch.float32)[0].named_parameters()]
    masters = torch.load(checkpoint / "master_weights.pt", weights_only=True)
    return {name: masters[str(i)] for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def half_precision_runs(tmp_path_factory):
    """One process per half-precision dtype, 2 steps: the reference of the 2-rank runs below."""
    runs = {}
    for dtype in ("bfloat16", "float16"):
        runs[dtype] = tmp_path_factory.mktemp(dtype) / "out"
        train(runs[dtype], None, max_steps=2, dtype=dtype)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, dtype, extra",
    [
        ("ddp", "bfloat16", {}),
        ("fsdp", "bfloat16", {}),
        ("fsdp", "float16", {"gradient_checkpointing": True}),
        ("ddp", "float16", {}),
    ],
    ids=["ddp-bf16", "fsdp-bf16", "fsdp-fp16-checkpointing", "ddp-fp16"],
)
def test_half_precision_two_ranks_equal_one_process(tmp_path, half_precision_runs, mode, dtype, extra):
    """bf16/fp16 compute with fp32 masters on 2 ranks equals one process in the same dtype: the same trees and
    metrics, fp32 masters within 1e-5 (only the order of fp32 sums differs: each rank's half-precision gradient
    is computed at the one-process scale and reduced in fp32), the export in the run's dtype and loadable."""
    from transformers import AutoModelForCausalLM

    one, out = half_precision_runs[dtype], tmp_path / "run"
    train(out, 2, max_steps=2, parallel=mode, dtype=dtype, **extra)
    assert_same_metrics(records(one), records(out))
    masters = dcp_weights(out / "checkpoint-2", tmp_path / "state.pt")
    assert {v.dtype for v in masters.values()} == {torch.float32}
    reference = one_process_masters(one / "checkpoint-2")
    initial = weights(HERE.parent / "treerpo" / "models" / "tiny_chain")
    moved = [k for k in reference if not torch.equal(reference[k], initial[k].to(getattr(torch, dtype)).float())]
    assert len(moved) == len(reference), "every master must move for the comparison to mean anything"
    assert_close_weights(reference, {name: masters[name] for name in reference})  # tied names appear once there
    exported = weights(out / "checkpoint-2")
    assert {v.dtype for v in exported.values()} == {getattr(torch, dtype)}
    assert_close_weights(weights(one / "checkpoint-2"), exported)
    for name, tensor in exported.items():  # the export is the masters rounded, as one process rounds them
        assert torch.equal(tensor, masters[name].to(tensor.dtype)), name
    loaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2", dtype="auto")
    assert loaded.dtype == getattr(torch, dtype)
    assert all(torch.equal(v, exported[k]) for k, v in loaded.state_dict().items() if k in exported)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_half_precision_resume_is_bit_exact(tmp_path, mode):
    options = dict(parallel=mode, dtype="bfloat16")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, 2, max_steps=2, **options)
    train(resumed, 2, max_steps=1, **options)
    done = train(resumed, 2, max_steps=2, resume=True, **options)
    assert "resumed from" in done.stdout + done.stderr
    first_stop = records(resumed)
    first_stop[0].pop("eval_accuracy")  # the first run ended at step 1, so it evaluated there
    assert_same_metrics(records(straight), first_stop)
    for kind in (weights, lambda c: dcp_weights(c, tmp_path / f"{c.parent.name}.pt")):
        a, b = kind(straight / "checkpoint-2"), kind(resumed / "checkpoint-2")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def run_worker(task: str, config: dict, prefix: Path, nproc: int = 2) -> None:
    command = torchrun([str(HERE / "distributed_worker.py"), task, json.dumps(config), str(prefix)], nproc)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment())
    assert done.returncode == 0, done.stderr[-3000:]


def one_process_trainer(tmp_path: Path, **options) -> Trainer:
    return Trainer(make_config({**SMALL, "output_dir": str(tmp_path / "single"), **options}), log=lambda *a: None)


@pytest.mark.slow
def test_trees_do_not_depend_on_the_number_of_ranks(tmp_path):
    from distributed_worker import rollout_trees

    config = {**SMALL, "prompts_per_step": 5, "output_dir": str(tmp_path / "two"), "parallel": "ddp"}
    run_worker("trees", config, tmp_path / "trees")
    per_rank = [torch.load(tmp_path / f"trees.rank{r}.pt") for r in range(2)]
    assert [len(s) for s in per_rank[0]] == [3, 3] and [len(s) for s in per_rank[1]] == [2, 2]  # uneven shares
    with one_process_trainer(tmp_path, prompts_per_step=5) as trainer:
        single = rollout_trees(trainer, 2)
    for step in range(2):
        assert single[step] == per_rank[0][step] + per_rank[1][step], step
    assert single[0] != single[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_rank_without_kept_groups_finishes_with_the_right_gradient(tmp_path, mode):
    """Rank 1 has nothing to train on: it pads with zero-loss micro-batches (no hang) and the update equals one
    process training on the same trees, rank 1's share emptied the same way."""
    config = {**SMALL, "output_dir": str(tmp_path / "two"), "parallel": mode, "kl_coef": 0.0}
    run_worker("uneven", config, tmp_path / "uneven")
    two = torch.load(tmp_path / "uneven.weights.pt")
    with one_process_trainer(tmp_path, kl_coef=0.0) as trainer:
        seed_everything(step_seed(0, 0))
        trees = trainer.rollout(0)
        from treerpo.rewards.scoring import score_trees

        score_trees(trees, trainer.tokenizer, trainer.reward_fn)
        trainer.advantages(trees)
        assert any(t.kept.any() for t in trees[:2]), "rank 0's share must have something to train on"
        for i in World(rank=1, size=2).shard(len(trees)):
            trees[i].kept[:] = False
            trees[i].advantage[:] = 0.0
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.update(trees)
        one = trainer.model.state_dict()
    assert any(not torch.equal(before[k], one[k]) for k in one)
    assert_close_weights({k: v for k, v in one.items() if k in two}, two)


def rank_pids(torchrun_pid: int) -> dict[int, int]:
    """Worker pids by rank, read from the environment of torchrun's children."""
    out = {}
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    for pid in map(int, children):
        env = dict(
            item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item
        )
        if "RANK" in env:
            out[int(env["RANK"])] = pid
    return out


@pytest.mark.slow
def test_sigkill_of_one_rank_then_resume_equals_the_uninterrupted_run(tmp_path):
    options = dict(max_steps=4, parallel="fsdp")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(straight, 2, **options)
    args = flags({**SMALL, "output_dir": str(killed), **options})
    proc = subprocess.Popen(
        torchrun(["-m", "treerpo.train", *args]),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoint-2" / "trainer_state.json").exists():  # step 3 has begun (or is about to)
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 2's checkpoint"
            time.sleep(0.05)
        os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
        proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not (killed / "checkpoint-4").exists(), "the kill must interrupt the run"
    done = train(killed, 2, resume=True, **options)
    assert "resumed from" in done.stdout + done.stderr
    assert_same_metrics(records(straight), records(killed))
    assert [r["step"] for r in records(killed)] == [1, 2, 3, 4]
    a, b = weights(straight / "checkpoint-4"), weights(killed / "checkpoint-4")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_resume_at_another_world_size_says_steps_are_not_bit_identical(tmp_path):
    out = tmp_path / "run"
    train(out, 2, max_steps=1, parallel="fsdp")
    done = train(out, 1, max_steps=2, parallel="fsdp", resume=True)
    assert "written by 2 ranks and this run has 1" in done.stdout + done.stderr
    assert [r["step"] for r in records(out)] == [1, 2]


@pytest.mark.parametrize(
    "env, resolved",
    [
        ({}, "none"),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "none"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "ddp"),
    ],
    ids=["one-process", "torchrun-1", "torchrun-2"],
)
def test_parallel_left_out_follows_the_launch(env, resolved):
    """torchrun users get data parallelism without a flag, as TRL/accelerate and verl give it."""
    config = make_config({})
    assert config.parallel == "auto"
    assert config.validate_launch(environ=env).parallel == resolved


@pytest.mark.parametrize(
    "options, env, message",
    [
        ({"parallel": "ddp"}, {}, "needs a torchrun launch"),
        ({"parallel": "none"}, {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "pass --parallel ddp"),
        (
            {"parallel": "fsdp", "sampler": "reference"},
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            "needs --sampler engine",
        ),
    ],
)
def test_unsupported_combinations_are_refused_before_any_work(monkeypatch, options, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        make_config(options).validate_launch()


@pytest.mark.slow
def test_scaling_benchmark_writes_ratios(tmp_path):
    out = tmp_path / "scaling.json"
    subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "benchmarks" / "scaling.py"),
            "--ranks",
            "1",
            "2",
            "--steps",
            "2",
            "--prompts-per-rank",
            "2",
            "--global-prompts",
            "2",
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=600,
        env=environment(),
    )
    result = json.loads(out.read_text())
    assert [p["ranks"] for p in result["weak"]] == [1, 2] and [p["prompts_per_step"] for p in result["weak"]] == [2, 4]
    assert [p["prompts_per_step"] for p in result["strong"]] == [2, 2]
    assert set(result["ratios"]) == {
        "weak_efficiency_2_ranks",
        "weak_tokens_per_s_speedup_2_ranks",
        "strong_steps_per_s_speedup_2_ranks",
    }
    assert all(v > 0 for v in result["ratios"].values())


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = flags({**SMALL, "output_dir": str(out), "max_steps": 200, "save_every": 0, "parallel": "ddp"})
    proc = subprocess.Popen(
        torchrun(["-m", "treerpo.train", *args]),
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = [r["step"] for r in records(out)]
    assert 1 <= len(steps) < 200 and steps == list(range(1, len(steps) + 1))
    latest = out / (out / "latest").read_text()
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == steps[-1]
    assert stderr.count("resume with:") == 1  # rank 0 speaks for all
    assert "torchrun --nnodes=1 --nproc_per_node=2 -m treerpo.train" in stderr
