"""Tree-masked attention: one interface, several backends, hooked into Hugging Face models."""

from treerpo.attention.context import TreeAttentionMetadata, attention_metadata, current_tree_metadata, tree_attention
from treerpo.attention.hf_integration import ATTENTION_NAME, enable_tree_attention, register
from treerpo.attention.registry import (
    available_tree_backends,
    default_tree_backend,
    get_tree_backend,
    register_tree_backend,
)
from treerpo.attention.sdpa_backend import interval_mask, sdpa_tree_attention, tree_blocks

register()

__all__ = [
    "ATTENTION_NAME",
    "TreeAttentionMetadata",
    "attention_metadata",
    "available_tree_backends",
    "current_tree_metadata",
    "default_tree_backend",
    "enable_tree_attention",
    "get_tree_backend",
    "interval_mask",
    "register_tree_backend",
    "sdpa_tree_attention",
    "tree_attention",
    "tree_blocks",
]
