"""Tests of treerpo.rewards.math_verify_reward on hand cases and on ../shared/data."""

import multiprocessing as mp
import os
import random
import re
import signal
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from treerpo.data.math_datasets import load_problems
from treerpo.rewards.math_verify_reward import WORKER_NAME, MathVerifyReward, extract_boxed, prepare_gold

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"math data folder {DATA} is absent")
DATA_FILES = [
    "math_train.json",
    "math500_test.jsonl",
    "aime24_test.jsonl",
    "amc23_test.jsonl",
    "minerva_math_test.jsonl",
    "olympiadbench_test.jsonl",
    "gsm8k_train.jsonl",
    "gsm8k_test.jsonl",
]
PATHOLOGICAL = r"\boxed{9^{9^{9^{9^{9}}}}}"  # math-verify hangs (> 20 s) comparing this with 1
DEADLINE = 2.0  # of the hang tests; a worker start-up takes 8 s of CPU here (it imports torch)


@pytest.fixture(scope="module")
def reward():
    with MathVerifyReward(deadline_s=5.0, workers=2, spares=0) as r:  # few start-ups: 2 CPUs here
        yield r


@pytest.fixture(scope="module")
def hang_reward():
    """Two workers and two spares. A hang test calls ``warm_up()`` before timing a call:
    replacements of the workers an earlier test killed may still be starting."""
    with MathVerifyReward(deadline_s=DEADLINE, workers=2, spares=2) as r:
        yield r


def boxed(answer: str) -> str:
    return f"Some reasoning: 2 + 2 = 4, hence... so the answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------- extract_boxed
@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
        (r"\boxed{a_{1}^{2}+\sqrt{b_{3}}}", r"a_{1}^{2}+\sqrt{b_{3}}"),
        (r"first \boxed{1}, then \boxed{2}, finally \boxed{\{3, 4\}}.", r"\{3, 4\}"),
        (r"\fbox{7}", "7"),
        (r"\boxed {x+1}", "x+1"),
        (r"\boxed{\boxed{5}} end", r"\boxed{5}"),
        (r"\boxed{1} and \fbox{2}", "2"),
        (r"\boxed{}", ""),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text", ["no box here", "", r"\boxed 5", r"\boxed{1} then \boxed{\frac{2}{3}"])
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


# ----------------------------------------------------------------- prepare_gold
@pytest.mark.parametrize(
    "gold, expected",
    [
        ("4.5e33", r"$4.5 \times 10^{33}$"),
        ("1.2e-5", r"$1.2 \times 10^{-5}$"),
        ("3E+8", r"$3 \times 10^{8}$"),
        ("  7e07 ", r"$7 \times 10^{7}$"),
        ("1,450,000", "$1450000$"),
        ("-12,000", "$-12000$"),
        ("1,3,5", "$1,3,5$"),
        ("(1,450, 2)", "$(1,450, 2)$"),
        (r" \frac{14}{3} ", r"$\frac{14}{3}$"),
        ("$x^2$", "$x^2$"),
        (r"\boxed{5}", r"\boxed{5}"),
        ("$221,$8$", "$221,8$"),
        (r"x_2e3", r"$x_2e3$"),
    ],
)
def test_prepare_gold(gold, expected):
    assert prepare_gold(gold) == expected


# ----------------------------------------------------------------------- reward
def test_basic_scores(reward):
    completions = [
        boxed(r"\frac{1}{2}"),
        boxed("0.5"),
        boxed("3"),
        "no final answer: 1/2",
        boxed("1,450,000"),
        boxed(r"4.5 \times 10^{33}"),
        boxed("4.5e34"),
        r"\boxed{}",
    ]
    golds = ["1/2", r"\frac12", "4", "1/2", "1450000", "4.5e33", "4.5e33", "0"]
    assert reward(completions, golds) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert reward([], []) == []


def test_length_mismatch_raises(reward):
    with pytest.raises(ValueError, match="1 completions but 2 golds"):
        reward([boxed("1")], ["1", "2"])


def test_no_boxed_answer_starts_no_worker():
    r = MathVerifyReward()
    assert r(["the answer is 4", "4"], ["4", "4"]) == [0.0, 0.0]
    assert r._pool.procs == []
    r.close()


def test_works_from_thread(reward):
    out = {}

    def target():
        out["scores"] = reward([boxed("42"), boxed("41"), boxed(r"\sqrt{2}")], ["42", "42", r"2^{1/2}"])

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    assert out["scores"] == [1.0, 0.0, 1.0]


def test_recovers_from_dead_worker(reward):
    assert reward([boxed("5")], ["5"]) == [1.0]
    dead = next(w.proc for w in reward._pool.procs if w.ready)
    dead.kill()
    dead.join(5)
    assert reward([boxed("5"), boxed("6")], ["5", "5"]) == [1.0, 0.0]
    assert dead not in [w.proc for w in reward._pool.procs]


def test_startup_does_not_count_against_deadline():
    deadline = 0.2  # importing math-verify (sympy) alone takes longer anywhere
    with MathVerifyReward(deadline_s=deadline, workers=1, spares=0) as r:
        t0 = time.monotonic()
        assert r([boxed("1")], ["1"]) == [1.0]
        assert time.monotonic() - t0 > deadline  # the start-up alone takes longer


def test_signals_to_the_process_group_do_not_lose_answers():
    """Ctrl-C or SIGTERM sent to the trainer's process group reaches the workers too: a starting worker killed by
    one is restarted (not 'failed to start'), and a ready worker ignores them."""
    with MathVerifyReward(deadline_s=5.0, workers=1, spares=0) as r:
        r._pool._fill()
        starting = r._pool.procs[0].proc
        os.kill(starting.pid, signal.SIGTERM)
        assert r([boxed("3")], ["3"]) == [1.0]
        ready = r._pool.procs[0].proc
        assert ready is not starting
        for signum in (signal.SIGINT, signal.SIGTERM):
            os.kill(ready.pid, signum)
        assert r([boxed("4"), boxed("5")], ["4", "4"]) == [1.0, 0.0]
        assert r._pool.procs[0].proc is ready and ready.is_alive()


def test_worker_failing_to_start_raises():
    with MathVerifyReward(workers=1, spares=0, startup_timeout_s=0.01) as r:
        with pytest.raises(RuntimeError, match="worker failed to start"):
            r([boxed("1")], ["1"])
        assert r._pool.procs == []


def test_pathological_input_hits_deadline(hang_reward):
    margin = 1.5
    hang_reward.warm_up()
    t0 = time.monotonic()
    assert hang_reward([PATHOLOGICAL], ["1"]) == [0.0]
    assert time.monotonic() - t0 < DEADLINE + margin
    t0 = time.monotonic()
    assert hang_reward([boxed("3"), PATHOLOGICAL, boxed(r"\frac{6}{2}"), boxed("2")], ["3", "1", "3", "3"]) == [
        1.0,
        0.0,
        1.0,
        0.0,
    ]
    assert time.monotonic() - t0 < DEADLINE + margin


def test_hangs_in_one_batch_time_out_side_by_side(hang_reward):
    """More answers hang than there are workers. Both workers get stuck at once; after the
    stall delay (deadline / 4) the spares take the queue, one of them the third hang, the
    other the normal answers. All hangs time out by 1.25 deadlines (2.7 s measured); the
    bound of 2 deadlines leaves room for a busy machine. Serial replacement took at least
    2 deadlines plus a worker restart (the third hang waits for a freed worker)."""
    hang_reward.warm_up()  # replacements of workers killed by an earlier test are ready
    hangs = [PATHOLOGICAL] * 3
    normal = [boxed("3"), boxed(r"\frac{6}{2}"), boxed("2"), boxed("0.5"), boxed("7")]
    t0 = time.monotonic()
    scores = hang_reward(hangs + normal, ["1"] * 3 + ["3", "3", "3", "1/2", "8"])
    elapsed = time.monotonic() - t0
    assert scores == [0.0] * 3 + [1.0, 1.0, 0.0, 1.0, 0.0]
    assert elapsed < 2 * DEADLINE, elapsed


def test_call_after_hangs_uses_warm_spares(hang_reward):
    """Both workers are killed for hanging; the next call runs at once on the spares
    while their replacements start in the background."""
    hang_reward.warm_up()
    assert hang_reward([PATHOLOGICAL, PATHOLOGICAL, boxed("1")], ["1"] * 3) == [0.0, 0.0, 1.0]
    t0 = time.monotonic()
    assert hang_reward([boxed("3"), boxed("4"), boxed(r"\sqrt{9}")], ["3"] * 3) == [1.0, 0.0, 1.0]
    assert time.monotonic() - t0 < 1.0  # well under a worker start-up


def _live_workers() -> set[int]:
    return {p.pid for p in mp.active_children() if p.name == WORKER_NAME}


def test_worker_processes_stay_bounded(hang_reward):
    hang_reward.warm_up()
    before = _live_workers()
    for _ in range(2):
        assert hang_reward([PATHOLOGICAL, boxed("1")], ["1", "1"]) == [0.0, 1.0]
    assert len(hang_reward._pool.procs) == 4  # workers + spares
    assert len(_live_workers()) == len(before)  # killed workers were reaped, none leaked
    own = {w.proc.pid for w in hang_reward._pool.procs}
    hang_reward.close()
    assert not own & _live_workers()
    assert len(_live_workers()) == len(before) - 4


# --------------------------------------------------------- gold answers of files
def _wrong_answer(gold: str) -> str:
    """A clearly different value: gold + 1 for plain numbers, else -98765."""
    if re.fullmatch(r"-?\d+(\.\d+)?", gold) and abs(Decimal(gold)) < 10**9:
        return str(Decimal(gold) + 1)
    assert "98765" not in gold
    return "-98765"


@needs_data
@pytest.mark.parametrize("name", DATA_FILES)
def test_sampled_golds_verify(reward, name):
    problems = load_problems(DATA / name)
    sample = random.Random(1234).sample(problems, 20)
    golds = [p.answer for p in sample]
    right = reward([boxed(g) for g in golds], golds)
    assert right == [1.0] * 20, [g for g, s in zip(golds, right, strict=True) if s != 1.0]
    wrong = reward([boxed(_wrong_answer(g)) for g in golds], golds)
    assert wrong == [0.0] * 20, [g for g, s in zip(golds, wrong, strict=True) if s != 0.0]


@needs_data
def test_minerva_e_notation_golds(reward):
    problems = load_problems(DATA / "minerva_math_test.jsonl")
    enote = [p.answer for p in problems if re.fullmatch(r"\d+(\.\d+)?e-?\d+", p.answer)]
    assert len(enote) == 58
    latex = [re.sub(r"e(-?\d+)$", r" \\times 10^{\1}", g) for g in enote]
    # math-verify cannot tell apart values below ~1e-15 (2.88e-19 == 2.88e-18): skip those
    normal = [g for g in enote if int(g.split("e")[1]) > -15]
    assert len(normal) == 55
    off = [re.sub(r"e(-?\d+)$", lambda m: f"e{int(m.group(1)) + 1}", g) for g in normal]
    scores = reward([boxed(a) for a in enote + latex + off], enote * 2 + normal)
    assert scores == [1.0] * 116 + [0.0] * 55
