"""Tree attention backends by name: ``tree_attention(q, k, v, tin, tout, scale, cache) -> out``."""
from __future__ import annotations

import logging
from typing import Callable

from .optional_kernels import import_optional
from .paths_backend import paths_tree_attention
from .sdpa_backend import sdpa_tree_attention

TreeAttentionFn = Callable[..., "torch.Tensor"]  # noqa: F821

_BACKENDS: dict[str, TreeAttentionFn] = {"sdpa": sdpa_tree_attention, "paths": paths_tree_attention}
logger = logging.getLogger(__name__)


def register_tree_backend(name: str, fn: TreeAttentionFn) -> None:
    _BACKENDS[name] = fn


def get_tree_backend(name: str) -> TreeAttentionFn:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown tree attention backend {name!r}; available: {sorted(_BACKENDS)}") from None


def available_tree_backends() -> list[str]:
    return sorted(_BACKENDS)


def _register_triton() -> bool:
    """Import the Triton kernel and register it as "triton" (once); when it does not import, one notice, False."""
    kernel = import_optional("treerpo.kernels.tree_attention",
                             "Triton tree attention unavailable (%s: %s); using the sdpa backend.", logger)
    if kernel is not None and "triton" not in _BACKENDS:
        register_tree_backend("triton", kernel.triton_tree_attention)
    return kernel is not None


def default_tree_backend(device) -> str:
    """The fastest backend for a device: ``triton`` on CUDA when triton imports (else ``sdpa``, whose memory does
    not grow with prompt length x chunks), ``paths`` on CPU (its cost follows the visible pairs; ``sdpa``, the
    dense-mask reference, pays the square of each tree)."""
    import torch

    if torch.device(device).type == "cuda":
        return "triton" if _register_triton() else "sdpa"
    return "paths"


def _register_flex() -> bool:
    """Register the FlexAttention backend as "flex" when ``torch.nn.attention.flex_attention`` imports."""
    try:
        from .flex_backend import flex_tree_attention
    except Exception:  # an older torch without FlexAttention: the backend is simply not offered
        return False
    register_tree_backend("flex", flex_tree_attention)
    return True


_register_flex()
