"""Next-token sampling: temperature, top-k, top-p, per-request generators, log-probs of the chosen tokens.

The returned log-prob is that of the policy the trainer scores: log-softmax of
``logits / temperature`` (before top-k/top-p truncation; with the defaults, top_k = 0 and
top_p = 1, it is exactly the sampling distribution).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")


def truncate_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set holding top-p of the mass."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generators: Sequence[torch.Generator | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any dtype) -> (tokens [B], log-probs [B] in fp32).

    With ``generators`` each row draws from its own generator (the same seed, the same
    choice, whatever else is in the batch); without, the rows share torch's global RNG.
    """
    logits = logits.float()
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    scaled = logits / params.temperature
    logprobs = torch.log_softmax(scaled, -1)
    probs = truncate_logits(scaled, params.top_k, params.top_p).softmax(-1)
    if generators is None:
        tokens = torch.multinomial(probs, 1).squeeze(1)
    else:  # one uniform draw per row from its own generator, then a batched inverse-CDF lookup
        u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])
        cdf = probs.cumsum(-1)
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        tokens = tokens.clamp(max=probs.shape[-1] - 1)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)
