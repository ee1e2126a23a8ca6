"""The ``tree`` attention of Hugging Face models, registered with ``AttentionInterface``.

Outside a ``tree_attention(...)`` or ``paged_attention(...)`` block it is plain SDPA with the
model's own mask, so the same model generates normally with ``generate``. Inside a tree
block it runs the selected tree backend on the intervals of the packed batch; inside a
paged block (the engine) it reads and writes the KV pool; its mask function then returns no mask, which also keeps
transformers from reading the depth position ids as packed-sequence boundaries.
"""
from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .context import current_tree_metadata
from .paged import PagedAttentionMetadata, get_paged_backend
from .registry import get_tree_backend

ATTENTION_NAME = "tree"


METADATA_KWARG = "treerpo_metadata"


def tree_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    # the forward's keyword arguments reach here through the model's layers (as packed cu_seq_lens do); unlike
    # the context variable, they are captured by activation checkpointing and seen again when it recomputes
    meta = kwargs.pop(METADATA_KWARG, None) or current_tree_metadata()
    if meta is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row; got batch size {query.shape[0]}")
    if isinstance(meta, PagedAttentionMetadata):
        return get_paged_backend(meta.backend)(module, query, key, value, meta, scaling), None
    out = get_tree_backend(meta.backend)(query, key, value, meta.tin, meta.tout, scale=scaling, cache=meta.cache)
    return out.transpose(1, 2).contiguous(), None


def tree_mask(*args, **kwargs):
    if current_tree_metadata() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    AttentionInterface.register(ATTENTION_NAME, tree_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, tree_mask)


def enable_tree_attention(model):
    """Switch a loaded model to the ``tree`` attention (it still generates as before)."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        model.config._attn_implementation = ATTENTION_NAME
    return model
