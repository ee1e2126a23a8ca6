"""Triton kernels of treerpo (installed as ``treerpo.kernels``).

Kernels are tensor operations (and their autograd Functions): they take tensors only and import nothing
from ``treerpo``. What they need to know of trees (the tile skip lists, the engine's paged and cascade
metadata) is computed by ``treerpo.attention.triton_backends``, which also registers them as the "triton"
tree and paged backends (``treerpo.attention.registry``).
"""

__all__ = ["triton_tree_attention", "paged_decode_attention", "cascade_decode_attention", "cascade_decode_grouped"]


def __getattr__(name):
    """Lazy: ``treerpo.kernels`` imports without triton; the kernel module imports it on first use."""
    if name == "triton_tree_attention":
        from .tree_attention import triton_tree_attention
        return triton_tree_attention
    if name in ("paged_decode_attention", "cascade_decode_attention", "cascade_decode_grouped"):
        from . import paged_decode
        return getattr(paged_decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
