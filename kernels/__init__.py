"""Triton kernels of treerpo (installed as ``treerpo.kernels``).

Kernels take tensors only; they know nothing of trees' Python objects. The tree-attention
and paged-decode kernels plug into ``treerpo.attention``'s backend registry.
"""
