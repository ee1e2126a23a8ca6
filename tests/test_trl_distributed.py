"""TRL with treerpo on 2 processes (torchrun, gloo on the CPU, as ``accelerate launch`` starts them) against one
process on the same global batch: the same trees (seeded by global prompt index), a global loss normalizer, summed
gradients, so the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import assert_close_weights

pytest.importorskip("trl")

HERE = Path(__file__).parent


def launch(kind: str, processes: int, out: Path, global_batch: int = 8) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        str(HERE / "trl_distributed_worker.py"),
        kind,
        str(global_batch),
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(Path(str(out) + ".json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tree", "rollout"], ids=["TreeRPOTrainer", "treerpo_rollout"])
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, kind):
    from treerpo.models.tiny import load_model_and_tokenizer

    one_logs = launch(kind, 1, tmp_path / "one.pt")
    two_logs = launch(kind, 2, tmp_path / "two.pt")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    initial = load_model_and_tokenizer(None)[0].state_dict()
    moved = max(float((one[k] - initial[k]).abs().max()) for k in one)
    assert moved > 1e-4, "two optimizer steps must move the weights for the comparison to mean anything"
    lr = 1e-4 if kind == "tree" else 1e-3
    assert_close_weights(one, two, atol=1e-5, steps=2, lr=lr)  # AdamW turns reduction-order noise of ~0 gradients
    assert len(one_logs) == len(two_logs) == 2  # into up to lr a step: see assert_close_weights
    for a, b in zip(one_logs, two_logs, strict=True):  # global metrics: the same numbers on any process count
        for key in (
            "loss",
            "grad_norm",
            "reward",
            "reward_std",
            "frac_reward_zero_std",
            "completions/mean_length",
            "kl",
        ):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key  # step 1: loss ~ 0
