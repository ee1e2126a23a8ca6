"""Optional dense attention kernels: ``flash_attn`` and ``xformers``, used where they import and a GPU is present.

For a single causal sequence (e.g. the prompt-only prefix pass) ``causal_prefix_attention`` picks, in order:

1. flash_attn's ``flash_attn_func`` (CUDA, fp16/bf16);
2. xformers' ``memory_efficient_attention`` with a causal bias (CUDA);
3. PyTorch SDPA with ``is_causal=True`` (everywhere; flash/efficient SDPA kernels on a GPU).

On CUDA with neither package importable, one line is logged (once) naming the fallback. Not wired into
the engine: a helper for callers and benchmarks. ``import_optional`` (import once, say once when it fails)
also serves the Triton kernels' registration (``registry.py``).
"""

from __future__ import annotations

import importlib
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)
_import_cache: dict[str, object] = {}
_notice_logged = False


def import_optional(name: str, unavailable_notice: str | None = None, log: logging.Logger = logger):
    """The module, or None when it does not import (the result is remembered). ``unavailable_notice``, a format
    given the exception's type and message, is logged once, at the failed import."""
    if name not in _import_cache:
        try:
            _import_cache[name] = importlib.import_module(name)
        except Exception as exc:  # missing, or built for another torch/CUDA
            _import_cache[name] = None
            if unavailable_notice:
                log.warning(unavailable_notice, type(exc).__name__, exc)
    return _import_cache[name]


def _flash_attn_func():
    mod = import_optional("flash_attn")
    return getattr(mod, "flash_attn_func", None) if mod is not None else None


def _xformers_ops():
    return import_optional("xformers.ops")


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def available_dense_kernels(device) -> list[str]:
    """Dense kernels usable on ``device``, best first; ``sdpa`` is always last."""
    kernels = []
    if _is_cuda(device):
        if _flash_attn_func() is not None:
            kernels.append("flash_attn")
        if _xformers_ops() is not None:
            kernels.append("xformers")
    kernels.append("sdpa")
    return kernels


def _notice_once(device) -> None:
    global _notice_logged
    if not _notice_logged:
        _notice_logged = True
        logger.warning(
            "flash_attn and xformers unavailable on %s; the causal prefix pass uses PyTorch SDPA (is_causal=True).",
            device,
        )


def causal_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of one sequence: q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D] (GQA allowed)."""
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    kernels = available_dense_kernels(q.device)
    if "flash_attn" in kernels and q.dtype in (torch.float16, torch.bfloat16):
        # flash_attn wants [B, S, H, D] and handles GQA itself
        out = _flash_attn_func()(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True
        )
        return out.transpose(1, 2)
    if "xformers" in kernels:
        xops = _xformers_ops()
        if hkv != hq:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=xops.LowerTriangularMask(), scale=scale
        )
        return out.transpose(1, 2)
    if _is_cuda(q.device) and kernels == ["sdpa"]:
        _notice_once(q.device)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=hkv != hq)
