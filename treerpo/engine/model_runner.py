"""Runs a Hugging Face causal LM over the KV pool: packed prefill and batched decode in one entry point.

A forward takes any number of sequences, each with the pool slots of its cached path and
some new tokens; the new tokens of all sequences are packed into one row without padding,
their K/V written into fresh slots, and the logits of each sequence's last new token
returned. Prefill (many new tokens) and decode (one each) are the same call. Decode steps may come in
groups sharing a cached prefix (``SharedPrefixes``), which the attention then reads once per group.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..attention import enable_tree_attention
from ..attention.context import attention_metadata
from ..attention.registry import default_paged_backend  # looked up here by ModelRunner (tests patch it)
from ..lm_head import LMHead
from ..logprobs import decoder_of
from .step_builder import StepInputs, sequence_inputs

CASCADE_MIN_SAVED_BYTES = 1 << 20


@dataclass
class SequenceStep:
    cached_slots: np.ndarray | torch.Tensor  # int64 [P]: slots of the path already in the pool (positions 0..P-1)
    new_tokens: list[int]
    new_slots: np.ndarray | torch.Tensor  # int64 [len(new_tokens)]: where their K/V go


@dataclass
class SharedPrefixes:
    """Decode steps in groups that share a cached prefix: step i's cached path is
    ``prefixes[group_of_step[i]]`` followed by the step's own ``cached_slots``."""
    prefixes: list  # int64 slot arrays, one per group, none empty
    group_of_step: np.ndarray  # int64 [len(steps)]

    @property
    def prefix_len(self) -> np.ndarray:
        return np.fromiter(map(len, self.prefixes), dtype=np.int64, count=len(self.prefixes))


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
        self.head = LMHead(model)
        self.forward_tokens = 0  # tokens pushed through the model, for benchmarks
        self.paged_backend = default_paged_backend(self.device)  # attention/paged.py backend of every forward
        self.cascade_min_saved_bytes = CASCADE_MIN_SAVED_BYTES  # see cascade_pays

    @torch.no_grad()
    def forward(self, steps: list[SequenceStep], shared: SharedPrefixes | None = None) -> torch.Tensor:
        """fp32 logits [len(steps), vocab] after each sequence's last new token. With ``shared`` (decode steps),
        each step's ``cached_slots`` follow its group's shared prefix, which the attention reads once per group."""
        sequences = [(s.cached_slots, s.new_slots) for s in steps]
        prefixes, group_of_step = (None, None) if shared is None else (shared.prefixes, shared.group_of_step)
        return self.head.logits(self.run(sequence_inputs(self.pool, sequences, [s.new_tokens for s in steps],
                                                         self.device, prefixes, group_of_step)))

    @torch.no_grad()
    def run(self, inputs: StepInputs) -> torch.Tensor:
        """The one entry point of every forward over the pool: the final hidden states [B, hidden] at
        ``inputs.last_rows`` (``self.head.logits`` makes them logits; the engine does so a chunk of rows at a
        time, ``step_draw``)."""
        inputs.meta.backend = self.paged_backend
        with attention_metadata(inputs.meta):
            hidden = decoder_of(self.model)(input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                                            use_cache=False).last_hidden_state[0]
        self.forward_tokens += inputs.num_tokens
        return hidden[inputs.last_rows]

    def cascade_pays(self, shared: SharedPrefixes) -> bool:
        """Whether reading each group's prefix once spares at least ``cascade_min_saved_bytes`` of K/V per layer:
        below that the cascade's extra operations cost more than the bytes they save (measured on CPU)."""
        prefix_len = shared.prefix_len
        return self.cascade_spares_enough(int(prefix_len[shared.group_of_step].sum() - prefix_len.sum()))

    def cascade_spares_enough(self, repeated_keys: int) -> bool:
        """``cascade_pays`` from the number of prefix keys a step without the cascade would read again."""
        return repeated_keys * self.pool.bytes_per_token // self.pool.num_layers >= self.cascade_min_saved_bytes
