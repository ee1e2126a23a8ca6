"""The ``tree`` attention of Hugging Face models, registered with ``AttentionInterface``.

Outside a ``tree_attention(...)`` or ``paged_attention(...)`` block it is the model's own default
attention (SDPA, or the family's eager function with its soft-capping or sinks), so the same
model generates exactly as before. Inside a tree block it runs the selected tree backend on the
intervals of the packed batch; inside a paged block (the engine) it reads and writes the KV
pool; its mask function then returns no mask, which also keeps transformers from reading the
depth position ids as packed-sequence boundaries. A layer's sliding window, soft-capping and sinks
(``features.py``) run in the backends that implement them (tree: ``paths`` and ``sdpa``; paged: ``torch``):
a selected backend that does not (Triton, FlexAttention) is skipped for that layer in favour of one that does.
Attention dropout is refused with an error naming it, never computed differently.
"""

from __future__ import annotations

import copy
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from treerpo.attention.context import METADATA_KWARG, current_tree_metadata, prepared_mask
from treerpo.attention.features import attention_features
from treerpo.attention.kernel_check import checked_backend
from treerpo.attention.paged import PagedAttentionMetadata
from treerpo.attention.registry import get_paged_backend, get_tree_backend

ATTENTION_NAME = "tree"
FEATURE_BACKENDS = {"tree": ("paths", "sdpa"), "paged": ("torch",)}  # the first: what the others fall back on
DEFAULT_ATTENTION = "treerpo_default_attention"  # config attribute: the implementation used outside a block


class UnsupportedModelError(ValueError):
    """The model uses an attention feature the tree and paged attention do not implement."""


@torch.compiler.disable  # reads the step's metadata and picks a backend in Python: a compiled model calls it eagerly
def tree_attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
):
    # the forward's keyword arguments reach here through the model's layers (as packed cu_seq_lens do); unlike
    # the context variable, they are captured by activation checkpointing and seen again when it recomputes
    meta = kwargs.pop(METADATA_KWARG, None) or current_tree_metadata()
    if meta is None:
        if attention_mask is not None and attention_mask is prepared_mask(attention_mask.device):
            raise RuntimeError(
                "a forward handed the tree/paged prepared mask reached the model's own attention outside a tree or "
                "paged block: its all-true mask would attend both ways; run the forward inside the block"
            )
        return default_attention(module)(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    check_supported_call(module, dropout)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row; got batch size {query.shape[0]}")
    kind = "paged" if isinstance(meta, PagedAttentionMetadata) else "tree"
    features = attention_features(module, kwargs)
    if features.changes_scores or features.cuts(meta.max_positions):
        backend = meta.backend if meta.backend in FEATURE_BACKENDS[kind] else FEATURE_BACKENDS[kind][0]
        extra = {"features": features}
    else:
        backend = checked_backend(kind, meta.backend, query.device, query.dtype, heads_of(query, key))
        extra = {}
    if kind == "paged":  # inference only: the result's view base, if any, is of no use (and a compiled layer's guard)
        return get_paged_backend(backend)(module, query, key, value, meta, scaling, **extra).detach(), None
    out = get_tree_backend(backend)(query, key, value, meta.tin, meta.tout, scale=scaling, cache=meta.cache, **extra)
    return out.transpose(1, 2).contiguous(), None


def heads_of(query, key) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a [B, H, N, D] call."""
    return query.shape[1], key.shape[1], query.shape[3]


def default_attention(module):
    """The attention function the model used before ``enable_tree_attention`` (eager: its family's own)."""
    name = getattr(module.config, DEFAULT_ATTENTION, "sdpa")
    if name == "eager":
        family = sys.modules.get(type(module).__module__)
        eager = getattr(family, "eager_attention_forward", None)
        if eager is not None:
            return eager
    if name in ALL_ATTENTION_FUNCTIONS and name != ATTENTION_NAME:
        return ALL_ATTENTION_FUNCTIONS[name]
    return sdpa_attention_forward


def check_supported_call(module, dropout: float) -> None:
    if dropout:
        raise UnsupportedModelError(
            f"{type(module).__name__}: attention dropout {dropout} in a tree forward is "
            "not implemented; set config.attention_dropout = 0 for RL training"
        )


def tree_mask(*args, **kwargs):
    if current_tree_metadata() is not None:
        return None
    config = kwargs.get("config")
    name = getattr(config, DEFAULT_ATTENTION, "sdpa")
    if name != ATTENTION_NAME and name in ALL_MASK_ATTENTION_FUNCTIONS:
        return ALL_MASK_ATTENTION_FUNCTIONS[name](*args, **kwargs)
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    AttentionInterface.register(ATTENTION_NAME, tree_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, tree_mask)


def enable_tree_attention(model):
    """Switch a loaded model to the ``tree`` attention (it still generates as before).

    Only this model changes: it gets its own copy of its config (models built from one config
    object share it).
    """
    register()
    if getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME:
        return model
    own_config(model)
    for config in {id(c): c for c in configs_of(model)}.values():
        setattr(config, DEFAULT_ATTENTION, getattr(config, "_attn_implementation", None) or "sdpa")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        model.config._attn_implementation = ATTENTION_NAME
    return model


def configs_of(model) -> list:
    return [m.config for m in model.modules() if getattr(m, "config", None) is not None]


def own_config(model) -> None:
    """Give the model (and every submodule holding the same objects) private copies of its configs."""
    memo: dict = {}  # one memo: a sub-config held both by a composite config and by a module maps to one copy
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            module.config = copy.deepcopy(config, memo)
