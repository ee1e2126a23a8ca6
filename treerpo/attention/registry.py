"""Attention backends by kind and name, in one registry.

* ``"tree"``: ``fn(q, k, v, tin, tout, scale, cache) -> out``, the attention of a packed tree batch
  (``sdpa``, ``paths``, ``flex`` where FlexAttention imports, ``triton`` on CUDA);
* ``"paged"``: ``fn(module, query, key, value, meta, scale) -> out``, the engine's attention over its KV pool
  (``torch``, ``triton`` on CUDA).

The "triton" backends (``triton_backends.py``, adapting ``treerpo.kernels``) are registered lazily, when a
default backend is asked for a CUDA device and the kernel imports; when it does not, one warning, and the
PyTorch backend is the default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from treerpo.attention.optional_kernels import import_optional
from treerpo.attention.paged import paged_attention_torch
from treerpo.attention.paths_backend import paths_tree_attention
from treerpo.attention.sdpa_backend import sdpa_tree_attention

TreeAttentionFn = Callable[..., "torch.Tensor"]  # noqa: F821
PagedAttentionFn = Callable[..., "torch.Tensor"]  # noqa: F821


@dataclass(frozen=True)
class BackendKind:
    label: str  # what the kind computes, for messages
    triton_label: str  # what its Triton kernel computes, for the notice when it does not import
    reference: str  # the PyTorch backend: the fallback of the Triton one, and what kernel checks compare with
    triton_kernel: str  # the module of treerpo.kernels behind the "triton" backend
    triton_adapter: str  # its adapter in triton_backends.py


# the one table of backend kinds; the backends themselves, by name, in _BACKENDS
KINDS = {
    "tree": BackendKind(
        "tree attention", "Triton tree attention", "sdpa", "treerpo.kernels.tree_attention", "triton_tree_backend"
    ),
    "paged": BackendKind(
        "paged attention",
        "Triton paged decode attention",
        "torch",
        "treerpo.kernels.paged_decode",
        "paged_decode_backend",
    ),
}
_BACKENDS: dict[str, dict[str, Callable]] = {
    "tree": {"sdpa": sdpa_tree_attention, "paths": paths_tree_attention},
    "paged": {"torch": paged_attention_torch},
}
logger = logging.getLogger(__name__)


def _backends(kind: str) -> dict[str, Callable]:
    try:
        return _BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown attention backend kind {kind!r}; kinds: {sorted(_BACKENDS)}") from None


def register_backend(kind: str, name: str, fn: Callable) -> None:
    """Add (or replace) the ``kind`` backend ``name``."""
    _backends(kind)[name] = fn


def get_backend(kind: str, name: str) -> Callable:
    backends = _backends(kind)
    try:
        return backends[name]
    except KeyError:
        raise ValueError(f"unknown {KINDS[kind].label} backend {name!r}; available: {sorted(backends)}") from None


def available_backends(kind: str) -> list[str]:
    return sorted(_backends(kind))


def _register_triton(kind: str = "tree") -> bool:
    """Import the Triton kernel of ``kind`` and register its backend as "triton" (once); when the kernel does
    not import, one notice, False."""
    spec = KINDS[kind]
    notice = f"{spec.triton_label} unavailable (%s: %s); using the {spec.reference} backend."
    if import_optional(spec.triton_kernel, notice, logger) is None:
        return False
    if "triton" not in _backends(kind):
        from treerpo.attention import triton_backends

        register_backend(kind, "triton", getattr(triton_backends, spec.triton_adapter))
    return True


def reference_backend(kind: str) -> str:
    return KINDS[kind].reference


def _default_backend(kind: str, device, cpu_default: str) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return "triton" if _register_triton(kind) else KINDS[kind].reference
    return cpu_default


# ---------------------------------------------------------------------------------- the names callers use
def register_tree_backend(name: str, fn: TreeAttentionFn) -> None:
    register_backend("tree", name, fn)


def get_tree_backend(name: str) -> TreeAttentionFn:
    return get_backend("tree", name)


def available_tree_backends() -> list[str]:
    return available_backends("tree")


def default_tree_backend(device) -> str:
    """The fastest backend for a device: ``triton`` on CUDA when triton imports (else ``sdpa``, whose memory does
    not grow with prompt length x chunks), ``paths`` on CPU (its cost follows the visible pairs; ``sdpa``, the
    dense-mask reference, pays the square of each tree)."""
    return _default_backend("tree", device, "paths")


def register_paged_backend(name: str, fn: PagedAttentionFn) -> None:
    """Add a decode/prefill backend over the KV pool (e.g. a Triton paged kernel), selected by ``backend``."""
    register_backend("paged", name, fn)


def get_paged_backend(name: str) -> PagedAttentionFn:
    return get_backend("paged", name)


def available_paged_backends() -> list[str]:
    return available_backends("paged")


def default_paged_backend(device) -> str:
    """ "triton" (the paged decode kernel of ``treerpo.kernels.paged_decode``) on CUDA when it imports, else
    "torch"; says once when CUDA is there but the kernel does not import."""
    return _default_backend("paged", device, "torch")


def _register_flex() -> bool:
    """Register the FlexAttention backend as "flex" when ``torch.nn.attention.flex_attention`` imports."""
    try:
        from treerpo.attention.flex_backend import flex_tree_attention
    except Exception:  # an older torch without FlexAttention: the backend is simply not offered
        return False
    register_tree_backend("flex", flex_tree_attention)
    return True


_register_flex()
