"""Runs a Hugging Face causal LM over the KV pool: packed prefill and batched decode in one entry point.

A forward takes any number of sequences, each with the pool slots of its cached path and
some new tokens; the new tokens of all sequences are packed into one row without padding,
their K/V written into fresh slots, and the logits of each sequence's last new token
returned. Prefill (many new tokens) and decode (one each) are the same call (``run``, on the ``StepInputs`` of
``step_builder``). Decode steps may come in groups sharing a cached prefix, which the attention then reads once
per group (the cascade).
"""

from __future__ import annotations

import warnings

import torch

from treerpo.attention import enable_tree_attention
from treerpo.attention.context import attention_metadata, prepared_mask
from treerpo.attention.features import model_has_features
from treerpo.attention.registry import default_paged_backend  # looked up here by ModelRunner (tests patch it)
from treerpo.engine.compiled_layers import CompiledLayers, compiled_layers_active
from treerpo.engine.fused_layers import enable_fused_layers, fused_kernels_work, fused_layers_active
from treerpo.engine.sampling_head import SamplingHead
from treerpo.engine.step_builder import StepInputs
from treerpo.policy.lm_head import LMHead
from treerpo.policy.logprobs import decoder_of

CASCADE_MIN_SAVED_BYTES = 1 << 20


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a Hugging Face config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class ModelRunner:
    def __init__(self, model, pool, head_precision: str = "model", compile: bool = False):
        self.model = enable_tree_attention(model)
        self.pool = pool
        self.device = next(model.parameters()).device
        self.head = SamplingHead(LMHead(model), head_precision)  # the draws' head (sampling_head)
        self.forward_tokens = 0  # tokens pushed through the model, for benchmarks
        self.paged_backend = default_paged_backend(self.device)  # attention/paged.py backend of every forward
        self.cascade_min_saved_bytes = CASCADE_MIN_SAVED_BYTES  # see cascade_spares_enough
        self.cascade_capable = not model_has_features(model)  # windows, soft-capping, sinks: not in the cascade
        self.fused_layers = False  # the fused RMSNorm and rotary kernels in every forward (fused_layers), on CUDA
        self.compiled = CompiledLayers(self.model) if compile else None  # compiled_layers: Inductor fuses instead
        if self.device.type == "cuda" and not compile:
            self.use_fused_layers()

    def use_fused_layers(self) -> dict[str, int]:
        """Run the forwards with the fused norm and rotary kernels where the model computes exactly as Llama does
        (``fused_layers``); the default on CUDA. A device where they fail to compile or to agree with the model's own
        code keeps that code, with one warning. Returns what was swapped."""
        _, _, head_dim = kv_shape(self.model.config)
        hidden = self.model.config.hidden_size
        reason = fused_kernels_work(self.device, self.pool.dtype, hidden, head_dim)  # the compute dtype
        if reason is not None:
            warnings.warn(f"fused RMSNorm and rotary kernels not used on {self.device} ({self.pool.dtype}): {reason}")
            return {"norms": 0, "rope_families": 0}
        swapped = enable_fused_layers(self.model)
        self.fused_layers = True
        return swapped

    @torch.no_grad()
    def run(self, inputs: StepInputs) -> torch.Tensor:
        """The one entry point of every forward over the pool: the final hidden states [B, hidden] at
        ``inputs.last_rows`` (``self.head.logits`` makes them logits; the engine does so a chunk of rows at a
        time, ``step_draw``)."""
        inputs.meta.backend = self.paged_backend
        compiled = self.compiled is not None and self.compiled.active
        with attention_metadata(inputs.meta), fused_layers_active(self.fused_layers), compiled_layers_active(compiled):
            hidden = decoder_of(self.model)(
                input_ids=_plain(inputs.input_ids),
                position_ids=_plain(inputs.position_ids),
                attention_mask=prepared_mask(self.device),
                use_cache=False,
            ).last_hidden_state[0]
        self.forward_tokens += inputs.num_tokens
        return hidden[inputs.last_rows]

    def cascade_spares_enough(self, repeated_keys: int) -> bool:
        """Whether reading each group's prefix once spares at least ``cascade_min_saved_bytes`` of K/V per layer, given
        the prefix keys a step without the cascade would read again: below that the cascade's extra operations cost
        more than the bytes they save (measured on CPU). Never for a model with windows, soft-capping or sinks."""
        saved = repeated_keys * self.pool.bytes_per_token // self.pool.num_layers
        return self.cascade_capable and saved >= self.cascade_min_saved_bytes


def _plain(ids: torch.Tensor) -> torch.Tensor:
    """[1, N] with row-major strides and no view base (a host array's ``[None]`` has stride 0; a staged array is a view
    of its buffer): what a compiled layer's guards see is the same every step. No copy."""
    return ids.reshape(-1)[None].detach()
