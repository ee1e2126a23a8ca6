"""What a family adds to plain softmax attention, and the one PyTorch attention that computes all of it.

* a sliding window: a key is visible only within the last ``window`` positions of the query's path
  (transformers' ``kv_idx > q_idx - sliding_window``; Mistral, Qwen2 windows, Gemma 2/3 local layers, Starcoder2,
  GPT-OSS);
* attention logit soft-capping: ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2);
* attention sinks: a learned logit per query head, an extra column of the softmax whose value is zero (GPT-OSS).

A window is a mask, so the mask-taking backends apply it when it cuts a path; soft-capping and sinks change the
scores themselves, so a layer using them runs ``attend`` (fp32 scores and softmax, as the families' eager
functions) instead of a fused kernel. The Triton kernels and FlexAttention are skipped for any of the three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionFeatures:
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # [Hq]

    @property
    def changes_scores(self) -> bool:
        return bool(self.softcap) or self.sinks is not None

    def cuts(self, longest_path: int | None) -> bool:
        """Whether the window hides keys of a path of ``longest_path`` positions (unknown: assume it does)."""
        return bool(self.window) and (longest_path is None or longest_path > self.window)


NONE = AttentionFeatures()


def attention_features(module, kwargs: dict) -> AttentionFeatures:
    """The features of one attention call, from the keywords the family passes and the layer's attributes."""
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap") or None
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = getattr(module, "sinks", None)
    if not (window or softcap or sinks is not None):
        return NONE
    return AttentionFeatures(int(window) if window else None, float(softcap) if softcap else None, sinks)


def window_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None):
    """bool [..., Q, K]: key within the window of the query, or None without a window."""
    if not window:
        return None
    return key_positions[..., None, :] > query_positions[..., :, None] - window


def attend(query, key, value, visible, scale: float | None, features: AttentionFeatures) -> torch.Tensor:
    """query [B, Hq, Q, D], key/value [B, Hkv, K, D], visible bool broadcastable to [B, Hq, Q, K] -> [B, Hq, Q, D]
    in the query's dtype; scores, soft-cap, sinks and softmax in fp32. A row may see no key only with sinks."""
    hq, hkv, d = query.shape[1], key.shape[1], query.shape[-1]
    if hq != hkv:
        key, value = key.repeat_interleave(hq // hkv, dim=1), value.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * (d**-0.5 if scale is None else scale)
    if features.softcap:
        scores = torch.tanh(scores / features.softcap) * features.softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    if features.sinks is not None:
        sink = features.sinks.float().reshape(1, hq, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    weights = torch.softmax(scores, dim=-1)
    if features.sinks is not None:
        weights = weights[..., :-1]
    return torch.matmul(weights, value.float()).to(query.dtype)


def model_has_features(model) -> bool:
    """Whether any attention layer of ``model`` may use a window, soft-capping or sinks (then the engine does not
    group decode sequences by shared prefix: the cascade implements none of them)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "attn_logit_softcapping", None):
        return True
    if any(getattr(m, "sinks", None) is not None or getattr(m, "sliding_window", None) for m in model.modules()):
        return True
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False
