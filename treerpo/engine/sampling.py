"""Next-token sampling: temperature, top-k, top-p, per-request generators, log-probs of the chosen tokens.

The returned log-prob is that of the policy the trainer scores: log-softmax of
``logits / temperature`` (before top-k/top-p truncation; with the defaults, top_k = 0 and
top_p = 1, it is exactly the sampling distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def check_finite_logits(logits: torch.Tensor) -> None:
    """NaN or +inf logits mean diverged weights: refuse to sample (torch.multinomial would fail with a device
    assert on CUDA, and an inverse-CDF draw would silently pick garbage). -inf (a masked token) is fine."""
    if bool(torch.isnan(logits).any() | torch.isposinf(logits).any()):
        raise_nonfinite()


def inverse_cdf(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> torch.Tensor:
    """logits [R, V], fp64 uniforms u [R, K] -> tokens [R, K]: for each uniform, the first index whose cumulative
    probability (fp64, after temperature and truncation) exceeds u * total. K draws of a row share its CDF."""
    scaled = truncate_logits(logits.double() / params.temperature, params.top_k, params.top_p)
    cdf = torch.softmax(scaled, -1).cumsum(-1)
    tokens = torch.searchsorted(cdf, u.to(cdf.dtype) * cdf[:, -1:], right=True)
    return tokens.clamp(max=cdf.shape[-1] - 1)


def draw(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor, entropy: bool = False):
    """Batched draws for the engine, without any host synchronisation: logits [R, V] and fp64 uniforms u [R, K]
    (ignored when greedy) -> (tokens [R, K], their log-probs under ``logits / temperature`` [R, K] in fp32, a
    bool scalar tensor: some logit is NaN or +inf, and with ``entropy`` each row's entropy in nats under
    ``logits / temperature`` (temperature 1 when greedy), else None). Row r's K draws share its CDF.

    A row with a NaN or +inf logit draws garbage that the caller refuses. Memory: ``draw_bytes_per_logit``; the
    untruncated draw exponentiates an fp64 copy in place and sums it in place into the unnormalised CDF, whose
    last column gives the log-probs, and reads NaN or +inf off the row maxima, so it needs no other [R, V]
    buffer (the entropy one more fp64 copy)."""
    logits = logits.float()
    k = u.shape[1]
    if params.temperature == 0:
        return _draw_greedy(logits, k, entropy)
    if params.top_k or params.top_p < 1.0:
        return _draw_truncated(logits, params, u, entropy)
    scaled = logits.double().div_(params.temperature)
    top = scaled.amax(-1, keepdim=True)
    shifted = scaled.sub_(top)
    entropies = None
    if entropy:
        weights = shifted.exp()
        entropies = _entropy(shifted, weights, weights.sum(-1, keepdim=True))
    else:
        weights = shifted.exp_()
    cdf = weights.cumsum_(-1)  # unnormalised: the draw searches u * total, as inverse_cdf does
    total = cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u.to(cdf.dtype) * total, right=True).clamp_(max=cdf.shape[-1] - 1)
    logprobs = logits.gather(1, tokens).double() / params.temperature - top - total.log()
    return tokens, logprobs.float(), _not_finite(top), entropies


def draw_bytes_per_logit(params: SamplingParams, entropy: bool) -> int:
    """Bytes a logit of ``draw``'s input holds at the draw's peak (the fp32 logits included): 4 + 8 for the
    untruncated and the greedy draw, 8 more with the entropy; an upper estimate for top-k/top-p, which sorts."""
    if params.temperature != 0 and (params.top_k or params.top_p < 1.0):
        return TRUNCATED_DRAW_BYTES_PER_LOGIT
    return 4 + 8 + (8 if entropy else 0)


TRUNCATED_DRAW_BYTES_PER_LOGIT = 72  # a NaN-cleaned copy, fp64 sort values and indices, softmax, CDF, masks


def _draw_greedy(logits: torch.Tensor, k: int, entropy: bool):
    top = logits.amax(-1, keepdim=True)
    tokens = logits.argmax(-1, keepdim=True).expand(-1, k)
    shifted = (logits.double() if entropy else logits) - top
    weights = shifted.exp()
    total = weights.sum(-1, keepdim=True)
    logprobs = (logits.gather(1, tokens) - top - total.log()).float()
    return tokens, logprobs, _not_finite(top), _entropy(shifted, weights, total) if entropy else None


def _draw_truncated(logits, params: SamplingParams, u: torch.Tensor, entropy: bool):
    """``draw`` with top-k or top-p: the CDF of the truncated distribution, log-probs of the untruncated one."""
    bad = _not_finite(logits.amax(-1))
    logits = torch.nan_to_num(logits, nan=0.0, posinf=0.0)  # refused after the draw; keeps the sort sane
    tokens = inverse_cdf(logits, params, u)
    logprobs = torch.log_softmax(logits / params.temperature, -1)
    entropies = -(logprobs.exp() * logprobs).nan_to_num(0.0).sum(-1) if entropy else None
    return tokens, logprobs.gather(1, tokens), bad, entropies


def _entropy(shifted: torch.Tensor, weights: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(x) from fp64 ``shifted`` = x - max(x) (overwritten), its exponentials
    ``weights`` and their sum ``total``: log(total) - sum(weights * shifted) / total. A masked token (-inf) has
    weight 0 and adds nothing; the row dot product is a batched matmul, with no [R, V] temporary."""
    shifted.nan_to_num_(0.0, neginf=0.0)
    dot = torch.bmm(weights[:, None, :], shifted[:, :, None]).view(-1)
    total = total.view(-1)
    return (total.log() - dot / total).float()


def _not_finite(row_max: torch.Tensor) -> torch.Tensor:
    """bool scalar: some row's maximum is NaN (max propagates NaN), +inf, or -inf (no finite logit to draw from)."""
    return (~torch.isfinite(row_max)).any()


def raise_nonfinite() -> None:
    from treerpo.runtime.finite_guard import NonFiniteError

    raise NonFiniteError(
        "the model's next-token logits are not finite (NaN or +inf, or a row without a finite logit): its weights "
        "have diverged or overflowed; sampling stopped"
    )
