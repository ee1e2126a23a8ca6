"""Runs a Hugging Face causal LM over the KV pool: packed prefill and batched decode in one entry point.

A forward takes any number of sequences, each with the pool slots of its cached path and
some new tokens; the new tokens of all sequences are packed into one row without padding,
their K/V written into fresh slots, and the logits of each sequence's last new token
returned. Prefill (many new tokens) and decode (one each) are the same call.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..attention import enable_tree_attention
from ..attention.context import attention_metadata
from ..attention.paged import PagedAttentionMetadata
from ..logprobs import decoder_of

logger = logging.getLogger(__name__)
_triton_paged_state: bool | None = None  # None: not tried yet


def default_paged_backend(device) -> str:
    """"triton" (the paged decode kernel of ``treerpo.kernels.paged_decode``) on CUDA when it imports, else
    "torch"; says once when CUDA is there but the kernel does not import."""
    global _triton_paged_state
    if torch.device(device).type != "cuda":
        return "torch"
    if _triton_paged_state is None:
        try:
            import treerpo.kernels.paged_decode  # noqa: F401  (registers the "triton" paged backend)
        except Exception as exc:  # triton missing or broken: the PyTorch reference serves
            _triton_paged_state = False
            logger.warning("Triton paged decode attention unavailable (%s: %s); using the torch paged backend.",
                           type(exc).__name__, exc)
        else:
            _triton_paged_state = True
    return "triton" if _triton_paged_state else "torch"


@dataclass
class SequenceStep:
    cached_slots: "np.ndarray | torch.Tensor"  # int64 [P]: slots of the path already in the pool (positions 0..P-1)
    new_tokens: list[int]
    new_slots: "np.ndarray | torch.Tensor"  # int64 [len(new_tokens)]: where their K/V go


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a Hugging Face config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class ModelRunner:
    def __init__(self, model, pool):
        self.model = enable_tree_attention(model)
        self.pool = pool
        self.device = next(model.parameters()).device
        self.head = model.get_output_embeddings()
        self.forward_tokens = 0  # tokens pushed through the model, for benchmarks
        self.paged_backend = default_paged_backend(self.device)  # attention/paged.py backend of every forward

    @torch.no_grad()
    def forward(self, steps: list[SequenceStep]) -> torch.Tensor:
        """fp32 logits [len(steps), vocab] after each sequence's last new token."""
        ids, positions, last_rows, row = [], [], [], 0
        for s in steps:
            n = len(s.new_tokens)
            if n == 0:
                raise ValueError("every sequence in a forward needs at least one new token")
            ids.extend(s.new_tokens)
            positions.extend(range(len(s.cached_slots), len(s.cached_slots) + n))
            row += n
            last_rows.append(row - 1)
        meta = PagedAttentionMetadata.build(self.pool, [(s.cached_slots, s.new_slots) for s in steps], self.device)
        meta.backend = self.paged_backend
        input_ids = torch.tensor([ids], device=self.device)
        position_ids = torch.tensor([positions], device=self.device)
        with attention_metadata(meta):
            hidden = decoder_of(self.model)(input_ids=input_ids, position_ids=position_ids,
                                            use_cache=False).last_hidden_state[0]
        self.forward_tokens += len(ids)
        last = hidden[torch.tensor(last_rows, device=self.device)]
        logits = last.float() @ self.head.weight.float().t()
        if getattr(self.head, "bias", None) is not None:
            logits = logits + self.head.bias.float()
        return logits
