"""Pass@1 of a model on (prompt, gold) pairs: greedy, or the mean over n samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from treerpo.sampling.generation import continue_sequences, encode_prompts

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class AccuracyResult:
    accuracy: float  # mean score over problems and samples
    pass_at_n: float  # share of problems with at least one correct sample
    scores: np.ndarray  # [problems, n]
    completions: list[list[str]]
    mean_response_tokens: float


def pass_at_1(
    model,
    tokenizer,
    prompts: Sequence[str],
    golds: Sequence[str],
    reward_fn: RewardFn,
    max_new_tokens: int,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 256,
) -> AccuracyResult:
    was_training = model.training
    model.eval()
    try:
        prompt_ids = encode_prompts(tokenizer, prompts)
        repeated = [ids for ids in prompt_ids for _ in range(n)]
        outputs = continue_sequences(model, tokenizer, repeated, max_new_tokens, temperature, top_p, batch_size)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode([tokens for tokens, _ in outputs], skip_special_tokens=True)
    scores = np.asarray(reward_fn(texts, [g for g in golds for _ in range(n)]), dtype=float).reshape(len(prompts), n)
    return AccuracyResult(
        accuracy=float(scores.mean()) if scores.size else 0.0,
        pass_at_n=float((scores > 0.5).any(axis=1).mean()) if scores.size else 0.0,
        scores=scores,
        completions=[texts[i * n : (i + 1) * n] for i in range(len(prompts))],
        mean_response_tokens=float(np.mean([len(t) for t, _ in outputs])) if outputs else 0.0,
    )
