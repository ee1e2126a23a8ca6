"""The word-problem generator (treerpo/data/word_problems.py) and its task: determinism, held-out set, golds, reward."""

import re

import numpy as np
import pytest

from treerpo.config import ConfigError, make_config, parse_args
from treerpo.data.math_datasets import INSTRUCTION
from treerpo.data.tasks import WORD_PROBLEMS_HELD_OUT_SEED, load_task, word_problem_task
from treerpo.data.word_problems import WORKED_EXAMPLES, WordProblemTask


def solve_from_text(question: str) -> int:
    """An independent reading of a question: the numbers in its sentences, the operation from the wording."""
    sentences = [s for s in re.split(r"(?<=[.?])\s+", question) if s]
    opening = sentences[0] if "Each of the" not in sentences[1] else " ".join(sentences[:2])
    first = [int(n) for n in re.findall(r"\d+", opening)]
    value = first[0] * first[1] if "Each of the" in opening else first[0]
    assert len(first) == (2 if "Each of the" in opening else 1)
    for sentence in sentences[len(opening.split(". ")) : -1]:
        (n,) = (int(x) for x in re.findall(r"\d+", sentence))
        value += -n if "of them" in sentence else n
    assert sentences[-1].startswith("How many")
    return value


def test_hand_written_case_is_read_as_a_person_would():
    assert solve_from_text("Mia has 7 apples. She buys 5 more. How many apples does she have now?") == 12
    assert (
        solve_from_text(
            "Leo has 3 jars of shells. Each of the jars holds 4 shells. He loses 5 of them. "
            "How many shells does he have now?"
        )
        == 7
    )
    q, a = WORKED_EXAMPLES[0]
    assert f"\\boxed{{{solve_from_text(q)}}}" in a


def test_generator_is_deterministic_per_seed():
    task = WordProblemTask()
    a, b, c = task.problems(200, seed=3), task.problems(200, seed=3), task.problems(200, seed=4)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]
    assert len({p.question for p in a}) == 200  # distinct


@pytest.mark.parametrize("task", [WordProblemTask(), WordProblemTask(max_ops=2)], ids=["default", "two_ops"])
def test_gold_equals_an_independent_evaluation(task):
    problems = task.problems(500, seed=0)
    kinds = set()
    for p in problems:
        value = p.groups * p.per_group if p.groups else p.start
        for op, n in p.steps:
            value = value + n if op == "+" else value - n
        assert p.answer == value == solve_from_text(p.question), p.question
        assert p.gold == str(p.answer) and p.answer >= 1
        assert 1 <= len(p.steps) + (p.groups > 0) <= task.max_ops
        kinds.add((p.groups > 0, tuple(op for op, _ in p.steps)))
    # every shape appears: plain or product openings, additions and subtractions, one and two operations
    shapes = {(False, ("+",)), (False, ("-",)), (True, ())}
    if task.max_ops == 2:
        shapes |= {(False, (a, b)) for a in "+-" for b in "+-"} | {(True, ("+",)), (True, ("-",))}
    assert kinds == shapes


@pytest.mark.parametrize("max_ops", [1, 2])
def test_longest_prompts_bound_every_generated_prompt(max_ops):
    task = word_problem_task(8, None, WordProblemTask(max_ops=max_ops))
    bound = max(len(p) for p in task.training_prompts())
    prompts = [p for step in range(100) for p, _ in task.batch(step, 16, seed=0)]
    assert max(len(p) for p in prompts) <= bound
    assert max(len(p) for p in prompts) > bound - 40  # and the bound is near what is generated


def test_held_out_prompts_never_trained_on():
    small = WordProblemTask(max_ops=1, max_count=3, max_factor=2, mul_prob=0.0)  # few distinct problems
    task = word_problem_task(64, None, small)
    held_out = {p for p, _ in task.eval}
    assert len(held_out) == 64
    drawn = {task.train.sample(np.random.default_rng(s))[0] for s in range(2000)}
    assert drawn & held_out  # the generator alone would draw held-out problems ...
    for seed in (0, 1):
        for step in range(300):
            batch = task.batch(step, 8, seed)
            assert not {p for p, _ in batch} & held_out  # ... training never does
            assert batch == task.batch(step, 8, seed)  # a function of (seed, step)


def test_default_task_prompts_and_reward_kind():
    task = load_task("word-problems", None, 32, tokenizer=None)
    assert task.reward_kind == "math" and len(task.eval) == 32
    expected = WordProblemTask().problems(32, seed=WORD_PROBLEMS_HELD_OUT_SEED)
    assert [g for _, g in task.eval] == [p.gold for p in expected]
    for (prompt, _), p in zip(task.eval, expected, strict=True):
        assert prompt.endswith(f"Question: {p.question}\n{INSTRUCTION}\nAnswer:")
        assert WORKED_EXAMPLES[0][1] in prompt
    assert make_config({"dataset": "word-problems"}).dataset == "word-problems"


def test_math_reward_scores_the_golds():
    from treerpo.rewards.math_verify_reward import MathVerifyReward

    problems = WordProblemTask().problems(12, seed=5)
    golds = [p.gold for p in problems]
    right = [f"{p.start} ... The answer is \\boxed{{{p.answer}}}." for p in problems]
    wrong = [f"The answer is \\boxed{{{p.answer + 1}}}." for p in problems]
    unboxed = [f"The answer is {p.answer}." for p in problems]
    with MathVerifyReward(deadline_s=10.0, workers=1, spares=0) as reward:
        assert reward(right + wrong + unboxed, golds * 3) == [1.0] * 12 + [0.0] * 24


@pytest.mark.parametrize("name", ["word_problems", "gsm8k", "wordproblems", "data/problems.csv"])
def test_unknown_dataset_is_refused(name):
    with pytest.raises(ConfigError, match=r"dataset=.*not valid.*'synthetic', 'word-problems'.*\.jsonl/\.json"):
        make_config({"dataset": name})
    with pytest.raises(ConfigError, match="word-problems"):
        parse_args(["--dataset", name])


def test_the_preset_config_loads(monkeypatch, tmp_path):
    from pathlib import Path

    from treerpo.config import load_config_file
    from treerpo.models import smollm2, source

    preset = Path(__file__).resolve().parents[1] / "configs" / "smollm2_word_problems.yaml"
    config = make_config(load_config_file(preset))
    assert (config.model, config.dataset, config.reward) == ("smollm2", "word-problems", "auto")
    assert parse_args(["--config", str(preset), "--seed", "1"]).seed == 1
    monkeypatch.chdir(tmp_path)  # no folder named smollm2 here: the name means the packaged model
    monkeypatch.setattr(smollm2, "smollm2_dir", lambda: tmp_path / "made-from-gguf")
    assert source.resolve_model_source("smollm2") == (str(tmp_path / "made-from-gguf"), True)
