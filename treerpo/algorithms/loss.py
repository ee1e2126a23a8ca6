"""PPO-clip policy loss on per-token log-probs, with an optional k3 KL penalty to a reference policy."""

from __future__ import annotations

import torch


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    normalizer: float | None = None,
    kl_times_ratio: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted token-mean PPO-clip loss: token t counts ``weights[t]`` times (default: every token once; a boolean
    mask keeps the tokens where it is true).

    ``normalizer`` is the weighted number of loss tokens in the whole batch, so that a batch split into
    micro-batches gives the same gradient as one pass (defaults to this call's weight sum).
    ``clip_high`` (e.g. 0.28) makes the clip asymmetric; None means ``clip_low``.
    ``kl_times_ratio`` multiplies the KL term by the importance ratio (TRL's ``use_bias_correction_kl``): the
    unbiased reverse-KL gradient off-policy; on-policy too its gradient differs, the ratio being differentiable.
    """
    clip_high = clip_low if clip_high is None else clip_high
    mask = torch.ones_like(logprobs) if weights is None else weights.to(logprobs.dtype)
    denom = float(normalizer) if normalizer is not None else mask.sum().clamp(min=1.0)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    stats = {}
    if ref_logprobs is not None and kl_coef > 0:
        # k3 estimator of KL(pi || pi_ref): exp(ref - pi) - (ref - pi) - 1, always >= 0
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * (kl * ratio if kl_times_ratio else kl)
        stats["kl"] = float((kl.detach() * mask).sum() / max(float(mask.sum()), 1.0))
    loss = (per_token * mask).sum() / denom
    with torch.no_grad():
        n = max(float(mask.sum()), 1.0)
        stats["clip_fraction"] = float(
            (((ratio - 1.0).abs() > 1e-12) & (unclipped != clipped)).to(mask.dtype).mul(mask).sum() / n
        )
        stats["ratio_mean"] = float((ratio * mask).sum() / n)
        # TRL's clipped-token fractions: below 1 - clip_low with a negative advantage, above 1 + clip_high with a
        # positive one, either
        low = (ratio < 1.0 - clip_low) & (advantages < 0)
        high = (ratio > 1.0 + clip_high) & (advantages > 0)
        for name, region in (("clip_low", low), ("clip_high", high), ("clip_region", low | high)):
            stats[name] = float(region.to(mask.dtype).mul(mask).sum() / n)
    return loss, stats
