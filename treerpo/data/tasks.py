"""What the trainer trains on: prompts with gold answers, a held-out set, and the reward that checks them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from treerpo.config import GENERATED_DATASETS, ConfigError
from treerpo.data.synthetic import ChainTask, chain_reward
from treerpo.data.word_problems import WORKED_EXAMPLES, WordProblemTask

RewardFn = Callable[[list[str], list[str]], list[float]]
HELD_OUT_SEED = 12345  # the synthetic held-out set; training problems never repeat it
WORD_PROBLEMS_HELD_OUT_SEED = 54321  # the word problems' held-out set; training problems never repeat it


class WordProblemPrompts:
    """Fresh word problems as chat prompts asking for a boxed answer (``format_math_prompt``), each after a worked
    example."""

    def __init__(self, tokenizer, generator: WordProblemTask | None = None):
        self.generator = generator or WordProblemTask()
        self.tokenizer = tokenizer

    def prompt(self, question: str) -> str:
        from treerpo.data.math_datasets import format_math_prompt

        return format_math_prompt(question, self.tokenizer, WORKED_EXAMPLES)

    def sample(self, rng: np.random.Generator) -> tuple[str, str, None]:
        problem = self.generator.generate(rng)
        return self.prompt(problem.question), problem.gold, None

    def longest_prompts(self) -> list[str]:
        return [self.prompt(q) for q in self.generator.longest_questions()]


@dataclass
class PromptTask:
    name: str
    train: list[tuple[str, str]] | ChainTask | WordProblemPrompts  # (prompt, gold) pairs, or a generator of fresh ones
    eval: list[tuple[str, str]]
    reward_kind: str  # "chain" or "math"

    def batch(self, step: int, size: int, seed: int) -> list[tuple[str, str]]:
        """The training prompts of one step: a function of (seed, step) only, so a resumed run sees the same ones."""
        rng = np.random.default_rng([seed, step, 7])
        if not isinstance(self.train, list):
            held_out = {p for p, _ in self.eval}
            out = []
            while len(out) < size:
                prompt, gold, _ = self.train.sample(rng)
                if prompt not in held_out:
                    out.append((prompt, gold))
            return out
        idx = rng.choice(len(self.train), size=size, replace=len(self.train) < size)
        return [self.train[i] for i in idx]

    def training_prompts(self) -> list[str]:
        """Prompts that bound what training will feed the model: every prompt of a file, or the generator's
        longest possible prompt."""
        if isinstance(self.train, ChainTask):
            return [self.train.longest_prompt()]
        if isinstance(self.train, WordProblemPrompts):
            return self.train.longest_prompts()
        return [p for p, _ in self.train]


def synthetic_task(eval_size: int) -> PromptTask:
    task = ChainTask()
    held_out = [(p, g) for p, g, _ in task.problems(eval_size, seed=HELD_OUT_SEED)]
    return PromptTask("synthetic-chain", task, held_out, "chain")


def word_problem_task(eval_size: int, tokenizer, generator: WordProblemTask | None = None) -> PromptTask:
    """Generated word problems (``data/word_problems.py``) under the math reward; a fixed held-out set."""
    prompts = WordProblemPrompts(tokenizer, generator)
    held_out = [
        (prompts.prompt(p.question), p.gold)
        for p in prompts.generator.problems(eval_size, seed=WORD_PROBLEMS_HELD_OUT_SEED)
    ]
    return PromptTask("word-problems", prompts, held_out, "math")


def math_file_task(path: str, eval_path: str | None, eval_size: int, tokenizer) -> PromptTask:
    from treerpo.data.math_datasets import format_math_prompt, load_problems

    def pairs(problems):
        return [(format_math_prompt(p.question, tokenizer), p.answer) for p in problems]

    train = pairs(load_problems(path))
    if eval_path:
        if not Path(eval_path).exists():
            raise FileNotFoundError(f"eval_dataset {eval_path!r} does not exist")
        held_out = pairs(load_problems(eval_path))[:eval_size]
    else:
        if len(train) <= eval_size:
            raise ConfigError(
                f"{path} has {len(train)} problems: too few to hold out eval_size={eval_size}; "
                "pass a smaller eval_size or an eval_dataset file"
            )
        train, held_out = train[:-eval_size], train[-eval_size:]
    return PromptTask(Path(path).stem, train, held_out, "math")


def load_task(dataset: str, eval_dataset: str | None, eval_size: int, tokenizer) -> PromptTask:
    if dataset == "synthetic":
        return synthetic_task(eval_size)
    if dataset == "word-problems":
        return word_problem_task(eval_size, tokenizer)
    if not Path(dataset).exists():
        raise FileNotFoundError(
            f"dataset {dataset!r} is neither one of {list(GENERATED_DATASETS)} nor an existing .jsonl/.json file"
        )
    return math_file_task(dataset, eval_dataset, eval_size, tokenizer)


def make_reward(kind: str, deadline_s: float = 5.0) -> RewardFn:
    if kind == "chain":
        return chain_reward
    from treerpo.rewards.math_verify_reward import MathVerifyReward

    return MathVerifyReward(deadline_s=deadline_s)
