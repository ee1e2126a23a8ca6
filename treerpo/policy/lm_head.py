"""The model's output layer as one function for the engine, the samplers and the trainer.

Hidden states -> fp32 logits with the family's own post-processing (Granite's ``logits_scaling``,
Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``, Gemma's ``final_logit_softcapping``).
The weights stay in the model's dtype: an fp32 model
multiplies directly; a half-precision one converts the head a vocabulary chunk at a time, so a
full fp32 copy of the head never exists (and the products accumulate in fp32).
"""

from __future__ import annotations

import torch

VOCAB_CHUNK = 16384


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class LMHead:
    def __init__(self, model):
        self.layer = model.get_output_embeddings()
        config = text_config(model.config)
        self.logits_scaling = getattr(config, "logits_scaling", None)  # Granite divides the logits by it
        self.logit_scale = getattr(config, "logit_scale", None) or getattr(config, "lm_head_multiplier", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)  # Gemma: cap * tanh(logits / cap)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> fp32 [rows, vocab], post-processed as the model's own forward does."""
        return self.post_process(self.raw_logits(hidden))

    def raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self.layer.weight, getattr(self.layer, "bias", None)
        if weight.dtype == torch.float32:
            logits = hidden.float() @ weight.t()
        else:
            h = hidden.float()
            logits = torch.cat([h @ chunk.float().t() for chunk in weight.split(VOCAB_CHUNK)], dim=1)  # one grad
        return logits + bias.float() if bias is not None else logits

    def post_process(self, logits: torch.Tensor) -> torch.Tensor:
        if self.logit_scale:  # Cohere multiplies by logit_scale, Falcon-H1 by lm_head_multiplier
            logits = logits * self.logit_scale
        if self.logits_scaling:
            logits = logits / self.logits_scaling
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log p(target | hidden) under ``logits / temperature``, fp32 [rows]."""
        logits = self.logits(hidden)
        if temperature != 1.0:
            logits = logits / temperature
        return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
