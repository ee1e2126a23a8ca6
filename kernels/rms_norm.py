"""RMSNorm forward in one kernel, rounded where Llama-style Hugging Face modules round it.

``weight * (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)``: the normalisation in fp32, rounded to the
input's dtype, then multiplied by the weight in the promoted dtype (a bf16 x bf16 product rounded once, as torch
does it). The fp32 sum of squares adds up in another order and rsqrt may differ in its last bit, so values agree
within a few units in the last place (tested). Hugging Face's module launches about eight kernels for this
(conversions, square, mean, add, rsqrt, two products); the decode step runs two such norms a layer. Inference only
(no autograd): the engine's forwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm", "launch_config"]


def launch_config(hidden: int) -> tuple[int, int]:
    """(block, warps): the whole row in one block, about 16 values a thread."""
    block = triton.next_power_of_2(hidden)
    return block, max(1, min(16, block // 512))


@triton.jit
def _rms_norm_fwd(X, W, OUT, n_cols, eps, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=valid, other=0.0)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, 0) / n_cols
    normed = (xf * tl.math.rsqrt(variance + eps)).to(x.dtype).to(tl.float32)  # HF's rounding to the input dtype
    w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_out + cols, (w * normed).to(OUT.dtype.element_ty), mask=valid)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] (last dim contiguous), weight [H] -> [..., H] in ``promote(weight, x)``'s dtype."""
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"weight of shape {tuple(weight.shape)} for a last dim of {h}")
    rows = x.reshape(-1, h)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        block, warps = launch_config(h)
        _rms_norm_fwd[(rows.shape[0],)](
            rows, weight, out, h, float(eps), rows.stride(0), out.stride(0), BLOCK=block, num_warps=warps
        )
    return out.view(*x.shape[:-1], h)
