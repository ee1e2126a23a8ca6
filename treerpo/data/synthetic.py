"""The synthetic task of the embedded default: multi-step integer arithmetic with a checkable answer.

Prompt ``12+7-15+3=``; solution ``12+7=19;19-15=4;4+3=7;#7``: one step per operator, then ``#``
and the final value. The reward reads the integer after the last ``#``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_ANSWER = re.compile(r"#(-?\d+)\s*$")


@dataclass(frozen=True)
class ChainTask:
    num_steps: int = 3
    operand_min: int = 1
    operand_max: int = 20

    def sample(self, rng: np.random.Generator) -> tuple[str, str, str]:
        """Return (prompt, gold answer, worked solution)."""
        operands = rng.integers(self.operand_min, self.operand_max + 1, size=self.num_steps + 1)
        signs = rng.choice(["+", "-"], size=self.num_steps)
        prompt = str(operands[0]) + "".join(f"{s}{o}" for s, o in zip(signs, operands[1:], strict=True)) + "="
        value, steps = int(operands[0]), []
        for sign, operand in zip(signs, operands[1:], strict=True):
            new_value = value + int(operand) if sign == "+" else value - int(operand)
            steps.append(f"{value}{sign}{operand}={new_value};")
            value = new_value
        return prompt, str(value), "".join(steps) + f"#{value}"

    def longest_prompt(self) -> str:
        widest = max(str(self.operand_min), str(self.operand_max), key=len)
        return "-".join([widest] * (self.num_steps + 1)) + "="

    def problems(self, count: int, seed: int, exclude: set[str] | None = None) -> list[tuple[str, str, str]]:
        """``count`` distinct problems from ``seed``, none of whose prompts is in ``exclude``."""
        rng = np.random.default_rng(seed)
        seen, out = set(exclude or ()), []
        while len(out) < count:
            problem = self.sample(rng)
            if problem[0] not in seen:
                seen.add(problem[0])
                out.append(problem)
        return out


def extract_chain_answer(completion: str) -> str | None:
    match = _ANSWER.search(completion.strip())
    return match.group(1) if match else None


def chain_reward(completions: list[str], golds: list[str]) -> list[float]:
    """1.0 when the completion ends with ``#<gold>``, else 0.0."""
    return [float(extract_chain_answer(c) == str(g).strip()) for c, g in zip(completions, golds, strict=True)]
