"""The ``tree`` attention of Hugging Face models, registered with ``AttentionInterface``.

Outside a ``tree_attention(...)`` or ``paged_attention(...)`` block it is the model's own default
attention (SDPA, or the family's eager function with its soft-capping or sinks), so the same
model generates exactly as before. Inside a tree block it runs the selected tree backend on the
intervals of the packed batch; inside a paged block (the engine) it reads and writes the KV
pool; its mask function then returns no mask, which also keeps transformers from reading the
depth position ids as packed-sequence boundaries. What the tree and paged paths do not implement
(attention soft-capping, sinks, dropout, a sliding window shorter than a path) is refused with
an error naming it, never computed differently.
"""

from __future__ import annotations

import copy
import sys

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from treerpo.attention.context import METADATA_KWARG, current_tree_metadata
from treerpo.attention.kernel_check import checked_backend
from treerpo.attention.paged import PagedAttentionMetadata
from treerpo.attention.registry import get_paged_backend, get_tree_backend

ATTENTION_NAME = "tree"
DEFAULT_ATTENTION = "treerpo_default_attention"  # config attribute: the implementation used outside a block


class UnsupportedModelError(ValueError):
    """The model uses an attention feature the tree and paged attention do not implement."""


def tree_attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
):
    # the forward's keyword arguments reach here through the model's layers (as packed cu_seq_lens do); unlike
    # the context variable, they are captured by activation checkpointing and seen again when it recomputes
    meta = kwargs.pop(METADATA_KWARG, None) or current_tree_metadata()
    if meta is None:
        return default_attention(module)(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    check_supported_call(module, meta, dropout, kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row; got batch size {query.shape[0]}")
    if isinstance(meta, PagedAttentionMetadata):
        backend = checked_backend("paged", meta.backend, query.device, query.dtype, heads_of(query, key))
        return get_paged_backend(backend)(module, query, key, value, meta, scaling), None
    backend = checked_backend("tree", meta.backend, query.device, query.dtype, heads_of(query, key))
    out = get_tree_backend(backend)(query, key, value, meta.tin, meta.tout, scale=scaling, cache=meta.cache)
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


def check_supported_call(module, meta, dropout: float, kwargs: dict) -> None:
    if kwargs.get("softcap"):
        raise UnsupportedModelError(unsupported("attention logit soft-capping", type(module).__name__))
    if getattr(module, "sinks", None) is not None:
        raise UnsupportedModelError(unsupported("attention sinks", type(module).__name__))
    if dropout:
        raise UnsupportedModelError(
            f"{type(module).__name__}: attention dropout {dropout} in a tree forward is "
            "not implemented; set config.attention_dropout = 0 for RL training"
        )
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    longest = getattr(meta, "max_positions", None)
    if window and longest is not None and longest > window:
        raise UnsupportedModelError(
            f"{type(module).__name__}: a sliding window of {window} positions is shorter than this batch's paths "
            f"(up to {longest} positions), and the tree and paged attention do not implement sliding windows; keep "
            f"prompt + depth x segment_tokens within {window} tokens"
        )


def unsupported(feature: str, where: str) -> str:
    return (
        f"{where} uses {feature}, which the tree and paged attention do not implement (its results would "
        "differ from the model's own); use another model family, or train this one without treerpo's tree "
        "attention"
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


def check_supported_model(model) -> None:
    """Refuse, before any work, what a family defines and the tree attention would compute differently."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    name = type(model).__name__
    if getattr(config, "attn_logit_softcapping", None):
        raise UnsupportedModelError(
            unsupported(f"attention logit soft-capping ({config.attn_logit_softcapping})", name)
        )
    if any(getattr(m, "sinks", None) is not None for m in model.modules()):
        raise UnsupportedModelError(unsupported("attention sinks", name))


def smallest_sliding_window(model) -> int | None:
    """The shortest sliding window of the model's attention layers (layer attribute, else the config's)."""
    layers = [m.sliding_window for m in model.modules() if getattr(m, "sliding_window", None)]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not layers and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        layers = [config.sliding_window]
    return min(layers, default=None)


def enable_tree_attention(model):
    """Switch a loaded model to the ``tree`` attention (it still generates as before).

    Only this model changes: it gets its own copy of its config (models built from one config
    object share it). Raises UnsupportedModelError for features the tree attention lacks.
    """
    register()
    if getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME:
        return model
    check_supported_model(model)
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
