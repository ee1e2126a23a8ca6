"""Host-side choices shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Running under ``TRITON_INTERPRET=1`` (the CPU interpreter of the development machines)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_modes(dtype: torch.dtype) -> tuple[bool, str | None]:
    """(upcast loads to fp32, tl.dot input precision): exact fp32 dots for fp32 inputs (no TF32), the
    backend's default for fp16/bf16 operands; bf16 is upcast in the interpreter, which computes it wrongly."""
    dot_fp32 = dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())
    return dot_fp32, ("ieee" if dtype == torch.float32 else None)


@triton.jit
def head_dim_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Which of the ``BLOCK_D`` columns are real (``offs_d < HEAD_DIM``). A constant when the head dim fills the
    block: the compiler then sees masks constant along the row, so loads vectorise (128-bit) and pipeline
    (asynchronous copies); a column mask kept there makes them scalar and spills registers."""
    if HEAD_DIM == BLOCK_D:
        return tl.full([BLOCK_D], 1, tl.int1)
    else:
        return offs_d < HEAD_DIM
