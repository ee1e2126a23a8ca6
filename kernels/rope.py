"""Rotary position embedding of the queries and keys in one kernel, rounded where Llama-style Hugging Face code rounds.

``q * cos + rotate_half(q) * sin`` (and the same for k), each product and the sum rounded to the tensors' dtype as
torch rounds them; Hugging Face launches about ten kernels for this (two products, a negation, a concatenation and
a sum, twice). Inference only (no autograd): the engine's forwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["apply_rope", "supported"]

NUM_WARPS = 1  # a program rotates one head of one token: at most 64 pairs


def launch_block(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim // 2)


@triton.jit
def _rope_fwd(
    X, COS, SIN, OUT, n_tokens, q_heads,
    stride_xb, stride_xh, stride_xt, stride_kb, stride_kh, stride_kt,
    stride_cb, stride_ct, stride_ob, stride_oh, stride_ot, stride_pb, stride_ph, stride_pt,
    K, KOUT, HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program a (batch, token, head): query heads first, then key heads."""
    pid = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    b = pid // n_tokens
    t = pid % n_tokens
    cols = tl.arange(0, BLOCK)
    valid = cols < HALF
    c_base = b * stride_cb + t * stride_ct
    cos1 = tl.load(COS + c_base + cols, mask=valid, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + c_base + HALF + cols, mask=valid, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + c_base + cols, mask=valid, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + c_base + HALF + cols, mask=valid, other=0.0).to(tl.float32)
    if head < q_heads:
        x_ptr = X + b * stride_xb + head * stride_xh + t * stride_xt
        o_ptr = OUT + b * stride_ob + head * stride_oh + t * stride_ot
    else:
        x_ptr = K + b * stride_kb + (head - q_heads) * stride_kh + t * stride_kt
        o_ptr = KOUT + b * stride_pb + (head - q_heads) * stride_ph + t * stride_pt
    x1 = tl.load(x_ptr + cols, mask=valid, other=0.0)
    x2 = tl.load(x_ptr + HALF + cols, mask=valid, other=0.0)
    dtype = x1.dtype
    # rotate_half(x) = cat(-x2, x1); every product and the sum rounded to the dtype, as torch's ops round them
    a1 = (x1.to(tl.float32) * cos1).to(dtype).to(tl.float32)
    b1 = (-x2.to(tl.float32) * sin1).to(dtype).to(tl.float32)
    a2 = (x2.to(tl.float32) * cos2).to(dtype).to(tl.float32)
    b2 = (x1.to(tl.float32) * sin2).to(dtype).to(tl.float32)
    tl.store(o_ptr + cols, (a1 + b1).to(dtype), mask=valid)
    tl.store(o_ptr + HALF + cols, (a2 + b2).to(dtype), mask=valid)


def supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``apply_rope`` takes these: q [B, Hq, T, D], k [B, Hkv, T, D], cos/sin [B or 1, T, D], one dtype,
    an even head dim, every last dim contiguous and cos and sin laid out alike."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    bsz, _, t, d = q.shape
    shapes = d % 2 == 0 and k.shape[0] == bsz and k.shape[2:] == (t, d) and cos.shape[1:] == (t, d)
    shapes = shapes and cos.shape[0] in (1, bsz)
    dtypes = q.dtype == k.dtype == cos.dtype == sin.dtype
    layout = all(x.stride(-1) == 1 for x in (q, k, cos, sin)) and sin.stride() == cos.stride()
    return bool(shapes and dtypes and layout)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, Hq, T, D], k [B, Hkv, T, D] (any strides, the head dim contiguous), cos/sin [B or 1, T, D] in the
    tensors' dtype -> (q_embed, k_embed), laid out as q and k."""
    if not supported(q, k, cos, sin):
        raise ValueError(
            f"rope of q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, cos/sin {tuple(cos.shape)} "
            f"{cos.dtype}: expected [B, Hq, T, D], [B, Hkv, T, D] and [B or 1, T, D] in one dtype, an even head dim "
            "and every last dim contiguous"
        )
    bsz, hq, t, d = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if bsz * t == 0:
        return q_out, k_out
    cb = cos.stride(0) if cos.shape[0] == bsz and bsz > 1 else 0
    _rope_fwd[(bsz * t, hq + k.shape[1])](
        q, cos, sin, q_out, t, hq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cb, cos.stride(-2), q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        k, k_out, HALF=d // 2, BLOCK=launch_block(d), num_warps=NUM_WARPS,
    )  # fmt: skip
    return q_out, k_out
