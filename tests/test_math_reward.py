"""Tests of treerpo.rewards.math_verify_reward on hand cases and on ../shared/data."""
import random
import re
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from treerpo.data.math_datasets import load_problems
from treerpo.rewards.math_verify_reward import MathVerifyReward, extract_boxed, prepare_gold

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"math data folder {DATA} is absent")
DATA_FILES = ["math_train.json", "math500_test.jsonl", "aime24_test.jsonl", "amc23_test.jsonl",
              "minerva_math_test.jsonl", "olympiadbench_test.jsonl", "gsm8k_train.jsonl",
              "gsm8k_test.jsonl"]
PATHOLOGICAL = r"\boxed{9^{9^{9^{9^{9}}}}}"  # math-verify hangs (> 20 s) comparing this with 1


@pytest.fixture(scope="module")
def reward():
    with MathVerifyReward(deadline_s=5.0) as r:
        yield r


def boxed(answer: str) -> str:
    return f"Some reasoning: 2 + 2 = 4, hence... so the answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------- extract_boxed
@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
    (r"\boxed{a_{1}^{2}+\sqrt{b_{3}}}", r"a_{1}^{2}+\sqrt{b_{3}}"),
    (r"first \boxed{1}, then \boxed{2}, finally \boxed{\{3, 4\}}.", r"\{3, 4\}"),
    (r"\fbox{7}", "7"),
    (r"\boxed {x+1}", "x+1"),
    (r"\boxed{\boxed{5}} end", r"\boxed{5}"),
    (r"\boxed{1} and \fbox{2}", "2"),
    (r"\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text", ["no box here", "", r"\boxed 5", r"\boxed{1} then \boxed{\frac{2}{3}"])
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


# ----------------------------------------------------------------- prepare_gold
@pytest.mark.parametrize("gold, expected", [
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
])
def test_prepare_gold(gold, expected):
    assert prepare_gold(gold) == expected


# ----------------------------------------------------------------------- reward
def test_basic_scores(reward):
    completions = [boxed(r"\frac{1}{2}"), boxed("0.5"), boxed("3"), "no final answer: 1/2",
                   boxed("1,450,000"), boxed(r"4.5 \times 10^{33}"), boxed("4.5e34"), r"\boxed{}"]
    golds = ["1/2", r"\frac12", "4", "1/2", "1450000", "4.5e33", "4.5e33", "0"]
    assert reward(completions, golds) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert reward([], []) == []


def test_length_mismatch_raises(reward):
    with pytest.raises(ValueError, match="1 completions but 2 golds"):
        reward([boxed("1")], ["1", "2"])


def test_no_boxed_answer_starts_no_worker():
    r = MathVerifyReward()
    assert r(["the answer is 4", "4"], ["4", "4"]) == [0.0, 0.0]
    assert r._slots == [None]
    r.close()


def test_works_from_thread(reward):
    out = {}

    def target():
        out["scores"] = reward([boxed("42"), boxed("41"), boxed(r"\sqrt{2}")],
                               ["42", "42", r"2^{1/2}"])

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    assert out["scores"] == [1.0, 0.0, 1.0]


def test_recovers_from_dead_worker(reward):
    assert reward([boxed("5")], ["5"]) == [1.0]
    reward._slots[0].proc.kill()
    reward._slots[0].proc.join(5)
    assert reward([boxed("5"), boxed("6")], ["5", "5"]) == [1.0, 0.0]


def test_pathological_input_hits_deadline():
    deadline, margin = 1.0, 1.5
    with MathVerifyReward(deadline_s=deadline) as r:
        assert r([boxed("1")], ["1"]) == [1.0]  # worker started and warm
        t0 = time.monotonic()
        assert r([PATHOLOGICAL], ["1"]) == [0.0]
        assert time.monotonic() - t0 < deadline + margin
        # a later item in the same batch is scored by a fresh worker
        t0 = time.monotonic()
        assert r([boxed("3"), PATHOLOGICAL, boxed(r"\frac{6}{2}"), boxed("2")],
                 ["3", "1", "3", "3"]) == [1.0, 0.0, 1.0, 0.0]
        assert time.monotonic() - t0 < deadline + 60  # one deadline + worker restart


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
    assert right == [1.0] * 20, [g for g, s in zip(golds, right) if s != 1.0]
    wrong = reward([boxed(_wrong_answer(g)) for g in golds], golds)
    assert wrong == [0.0] * 20, [g for g, s in zip(golds, wrong) if s != 0.0]


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
