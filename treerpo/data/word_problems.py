"""Arithmetic word problems in plain English, easy enough for a small instruct model to solve some of.

"Mia has 7 apples. She buys 5 more. How many apples does she have now?" -> "12". A problem is a
starting amount (a count, or groups times items per group) followed by add / subtract steps;
the gold answer is the integer the operations give, never negative. Everything is drawn from
a NumPy generator, so a seed fixes the problems.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NAMES = (
    ("Mia", "she"),
    ("Liam", "he"),
    ("Emma", "she"),
    ("Noah", "he"),
    ("Olivia", "she"),
    ("Lucas", "he"),
    ("Ava", "she"),
    ("Ethan", "he"),
    ("Sofia", "she"),
    ("Jacob", "he"),
    ("Zoe", "she"),
    ("Omar", "he"),
    ("Nina", "she"),
    ("Leo", "he"),
    ("Grace", "she"),
    ("Sam", "he"),
)
OBJECTS = (
    "apples",
    "pencils",
    "stickers",
    "marbles",
    "cookies",
    "books",
    "shells",
    "coins",
    "cards",
    "balloons",
    "oranges",
    "stamps",
    "toy cars",
    "candies",
    "flowers",
    "buttons",
)
CONTAINERS = ("bags", "boxes", "jars", "baskets", "packs", "bowls")
ADD_STEPS = (
    "{P} buys {n} more.",
    "{P} finds {n} more.",
    "{other} gives {o} {n} more.",
    "{P} gets {n} more from {other}.",
)
SUB_STEPS = (
    "{P} gives {n} of them to {other}.",
    "{P} loses {n} of them.",
    "{P} sells {n} of them.",
    "{P} uses {n} of them.",
)
QUESTIONS = ("How many {obj} does {p} have now?", "How many {obj} does {name} have now?")
_OBJ_PRONOUN = {"she": "her", "he": "him"}
# one worked example, an earlier chat turn of every prompt: a 135M instruct model copies its short form (the
# equation, then a boxed number) instead of a long list that runs out of tokens before any answer
WORKED_EXAMPLES = (
    (
        "Liam has 9 marbles. He gives 4 of them to Zoe. How many marbles does Liam have now?",
        "9 - 4 = 5. The answer is \\boxed{5}.",
    ),
)


@dataclass(frozen=True)
class WordProblem:
    question: str
    answer: int
    start: int  # the starting amount: ``groups * per_group`` when groups > 0
    groups: int  # 0: the problem starts from a plain count
    per_group: int
    steps: tuple[tuple[str, int], ...]  # ("+" or "-", amount), applied in order

    @property
    def gold(self) -> str:
        return str(self.answer)


@dataclass(frozen=True)
class WordProblemTask:
    """Problems of ``min_ops``..``max_ops`` operations; a starting product counts as one operation.

    The default is one operation (add, subtract or multiply): with two, SmolLM2-135M-Instruct solved 10-14% of
    held-out problems greedily, mostly failing by doing the wrong number of steps.

    ``max_count`` bounds a plain starting count and every added or removed amount; a product is
    ``groups`` in 2..``max_factor`` times ``per_group`` in 2..``max_factor``; ``mul_prob`` is the
    chance that a problem starts from a product.
    """

    min_ops: int = 1
    max_ops: int = 1
    max_count: int = 20
    max_factor: int = 6
    mul_prob: float = 0.3

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if self.max_count < 2 or self.max_factor < 2 or not 0 <= self.mul_prob <= 1:
            raise ValueError("need max_count >= 2, max_factor >= 2 and 0 <= mul_prob <= 1")

    def generate(self, rng: np.random.Generator) -> WordProblem:
        ops = int(rng.integers(self.min_ops, self.max_ops + 1))
        name, pronoun = NAMES[rng.integers(len(NAMES))]
        other = NAMES[rng.integers(len(NAMES))][0]
        while other == name:
            other = NAMES[rng.integers(len(NAMES))][0]
        obj = OBJECTS[rng.integers(len(OBJECTS))]
        fill = {
            "P": pronoun.capitalize(),
            "p": pronoun,
            "o": _OBJ_PRONOUN[pronoun],
            "name": name,
            "other": other,
            "obj": obj,
        }
        if rng.random() < self.mul_prob:
            groups, per_group = (int(x) for x in rng.integers(2, self.max_factor + 1, size=2))
            container = CONTAINERS[rng.integers(len(CONTAINERS))]
            start = groups * per_group
            sentences = [f"{name} has {groups} {container} of {obj}. Each of the {container} holds {per_group} {obj}."]
            ops -= 1
        else:
            groups, per_group = 0, 0
            start = int(rng.integers(2, self.max_count + 1))
            sentences = [f"{name} has {start} {obj}."]
        value, steps = start, []
        for _ in range(ops):
            if value >= 2 and rng.random() < 0.5:
                n = int(rng.integers(1, min(value - 1, self.max_count) + 1))
                sentences.append(SUB_STEPS[rng.integers(len(SUB_STEPS))].format(n=n, **fill))
                steps.append(("-", n))
                value -= n
            else:
                n = int(rng.integers(1, self.max_count + 1))
                sentences.append(ADD_STEPS[rng.integers(len(ADD_STEPS))].format(n=n, **fill))
                steps.append(("+", n))
                value += n
        sentences.append(QUESTIONS[rng.integers(len(QUESTIONS))].format(**fill))
        return WordProblem(" ".join(sentences), value, start, groups, per_group, tuple(steps))

    def problems(self, count: int, seed: int, exclude: set[str] | None = None) -> list[WordProblem]:
        """``count`` problems with distinct questions from ``seed``, none of whose questions is in ``exclude``."""
        rng = np.random.default_rng(seed)
        seen, out = set(exclude or ()), []
        while len(out) < count:
            problem = self.generate(rng)
            if problem.question not in seen:
                seen.add(problem.question)
                out.append(problem)
        return out

    def longest_questions(self) -> list[str]:
        """Questions at least as long as any the task generates, one per kind of opening and step wording: the
        widest numbers, the longest names, object and container, every step the longest of its kind."""
        name = max((n for n, _ in NAMES), key=len)
        other = max((n for n, _ in NAMES if n != name), key=len)
        obj, container = max(OBJECTS, key=len), max(CONTAINERS, key=len)
        n = self.max_count
        out = []
        for pronoun in ("she", "he"):
            fill = {
                "P": pronoun.capitalize(),
                "p": pronoun,
                "o": _OBJ_PRONOUN[pronoun],
                "name": name,
                "other": other,
                "obj": obj,
            }
            step = max((s.format(n=n, **fill) for s in ADD_STEPS + SUB_STEPS), key=len)
            question = max((q.format(**fill) for q in QUESTIONS), key=len)
            f = self.max_factor
            for opening, ops in (
                (f"{name} has {n} {obj}.", self.max_ops),
                (f"{name} has {f} {container} of {obj}. Each of the {container} holds {f} {obj}.", self.max_ops - 1),
            ):
                out.append(" ".join([opening] + [step] * ops + [question]))
        return out
