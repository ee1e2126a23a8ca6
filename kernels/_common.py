"""Host-side choices shared by the Triton kernels."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Running under ``TRITON_INTERPRET=1`` (the CPU interpreter of the development machines)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_modes(dtype: torch.dtype) -> tuple[bool, str | None]:
    """(upcast loads to fp32, tl.dot input precision): exact fp32 dots for fp32 inputs (no TF32), the
    backend's default for fp16/bf16 operands; bf16 is upcast in the interpreter, which computes it wrongly."""
    dot_fp32 = dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())
    return dot_fp32, ("ieee" if dtype == torch.float32 else None)
