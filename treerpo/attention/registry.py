"""Tree attention backends by name: ``tree_attention(q, k, v, tin, tout, scale, cache) -> out``."""
from __future__ import annotations

from typing import Callable

from .sdpa_backend import sdpa_tree_attention

TreeAttentionFn = Callable[..., "torch.Tensor"]  # noqa: F821

_BACKENDS: dict[str, TreeAttentionFn] = {"sdpa": sdpa_tree_attention}


def register_tree_backend(name: str, fn: TreeAttentionFn) -> None:
    _BACKENDS[name] = fn


def get_tree_backend(name: str) -> TreeAttentionFn:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown tree attention backend {name!r}; available: {sorted(_BACKENDS)}") from None


def available_tree_backends() -> list[str]:
    return sorted(_BACKENDS)


def default_tree_backend(device) -> str:
    """The fastest registered backend for a device (``sdpa`` until a faster one registers itself)."""
    return "sdpa"
