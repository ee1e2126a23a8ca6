"""Signals and the output-folder lock, on real training processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from treerpo.config import make_config
from treerpo.runtime.run_lock import OutputDirLockedError, RunLock
from treerpo.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--prompts-per-step",
    "4",
    "--branching",
    "2",
    "2",
    "2",
    "--segment-tokens",
    "12",
    "--eval-size",
    "8",
    "--eval-every",
    "0",
    "--save-every",
    "100",
    "--threads",
    "1",
    "--kv-pool-tokens",
    "4096",
    "--device",
    "cpu",
]


def default_stop_signals() -> None:
    """In the child: SIGINT/SIGTERM as a terminal delivers them. A job started in the background of a
    non-interactive shell inherits SIGINT ignored, and the trainer (rightly) keeps an ignored signal ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def start(out: Path, steps: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "treerpo.train", "--output-dir", str(out), "--max-steps", str(steps), *FLAGS, *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_stop_signals,
    )


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_steps(proc: subprocess.Popen, out: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while steps_logged(out) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not reach the step in time"
        time.sleep(0.05)


def metrics(out: Path) -> list[dict]:
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in lines]


def weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    proc = start(out, 6)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_with_a_checkpoint_and_resume_equals_the_straight_run(tmp_path, straight_run, signum):
    out = tmp_path / "run"
    proc = start(out, 6)
    wait_for_steps(proc, out, 2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    stopped_at = int((out / "latest").read_text().strip().split("-")[1])
    assert stopped_at == steps_logged(out) >= 2, "the checkpoint is of the last step logged"
    assert "--resume" in err and f"checkpoint-{stopped_at}" in err
    resumed = start(out, 6, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert metrics(out) == metrics(straight_run)
    a, b = weights(out / "checkpoint-6"), weights(straight_run / "checkpoint-6")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_second_signal_stops_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start(out, 500, "--prompts-per-step", "128", "--branching", "4", "2", "2")  # steps of seconds
    wait_for_steps(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # the second signal must reach the process after the first was handled
        if "SIGINT received" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped at once" in err
    assert not (out / "latest").exists(), "no checkpoint is written after the second signal"


def hold_lock(out: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from treerpo.runtime.run_lock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(OutputDirLockedError, match=rf"in use by another run \(pid {holder.pid}\)"):
            Trainer(make_config({"output_dir": str(tmp_path), "max_steps": 1}), log=lambda *a: None)
        assert not (tmp_path / "metrics.jsonl").exists(), "the refused run must not touch the folder"
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire().release()  # the kernel released the dead holder's lock


def test_stale_lock_file_does_not_block(tmp_path):
    (tmp_path / ".lock").write_text("999999\n")  # left by a process that died
    lock = RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(OutputDirLockedError):
        RunLock(tmp_path).acquire()  # a second open file description conflicts, even in one process
    lock.release()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--lr", "0.1"], "python -m treerpo.train --lr 0.1 --resume"),
        (["--resume", "false", "--output-dir", "a b"], "python -m treerpo.train --output-dir 'a b' --resume"),
        (["--resume=no", "--max-steps", "3", "--resume"], "python -m treerpo.train --max-steps 3 --resume"),
    ],
)
def test_printed_resume_command(argv, expected):
    from treerpo.train import resume_command

    assert resume_command(argv) == expected
