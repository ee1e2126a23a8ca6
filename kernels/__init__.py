"""Triton kernels of treerpo (installed as ``treerpo.kernels``).

Kernels take tensors only; they know nothing of trees' Python objects. The tree-attention
and paged-decode kernels plug into ``treerpo.attention``'s backend registry.
"""

__all__ = ["triton_tree_attention", "paged_decode_attention", "cascade_decode_attention"]


def __getattr__(name):
    """Lazy: ``treerpo.kernels`` imports without triton; the kernel module imports it on first use."""
    if name == "triton_tree_attention":
        from .tree_attention import triton_tree_attention
        return triton_tree_attention
    if name in ("paged_decode_attention", "cascade_decode_attention"):
        from . import paged_decode
        return getattr(paged_decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
