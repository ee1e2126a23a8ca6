"""Tree attention in Triton: flash-style forward and backward over the key tiles of a skip list.

Token q sees token k iff ``tin[k] <= tin[q] < tout[k]`` (k is an ancestor-or-self of q in a packed
depth-first batch). Queries and keys are cut into tiles of ``block`` rows (``block_config``); the caller
passes, as tensors, the skip list of those tiles: per query tile the key tiles holding at least one
visible pair (a CSR ``offsets``/``key_tiles``) and its transpose, per key tile the query tiles that see
it (``q_offsets``/``q_tiles``). This module knows nothing of trees beyond ``tin``/``tout``: the lists are
computed (once per batch, shared by every head and layer) by the caller, ``treerpo.attention.triton_backends``.
The kernels visit only those tiles:

* forward: one program per (query tile, query head); online softmax in fp32 (base 2), the output and
  the log-sum-exp (base 2, per row) are stored for the backward;
* backward (FlashAttention-2): ``delta = rowsum(dO * O)``; one program per (key tile, query head)
  walks the query tiles that see its key tile (the transposed skip list) and accumulates dK, dV in
  fp32 per query head; the grouped-query heads are summed in torch. One program per (query tile,
  query head) walks the key tiles of the CSR and accumulates dQ.

Grouped-query attention: query head h reads KV head ``h // (Hq // Hkv)``. Dots run on the input dtype
(fp16/bf16, fp32 accumulation) on a GPU, and on fp32 for fp32 inputs and under ``TRITON_INTERPRET=1``
for bf16 (the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_modes, interpreting

__all__ = ["triton_tree_attention", "TreeAttentionFunction", "block_config"]

LOG2E = 1.4426950408889634
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp2(-inf - _NEG) = 0, never NaN


# ----------------------------------------------------------------------------------------------- forward
@triton.jit
def _key_tile(
    k_base, v_base, TIN, TOUT, kt, tin_q, offs_d, d_valid, N, stride_kn, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr
):
    """K and V of key tile ``kt`` and which of its keys each query row (``tin_q``) sees: [BLOCK_M, BLOCK_N]."""
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    kv_off = offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    tin_k = tl.load(TIN + offs_n, mask=n_valid, other=2147483647)
    tout_k = tl.load(TOUT + offs_n, mask=n_valid, other=-2147483647)
    visible = (tin_k[None, :] <= tin_q[:, None]) & (tin_q[:, None] < tout_k[None, :])
    return k, v, visible


@triton.jit
def _tree_attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    TIN,
    TOUT,
    OFFSETS,
    KEY_TILES,
    N,
    HQ,
    HKV,
    GROUP,
    qk_scale,
    stride_qh,
    stride_qn,
    stride_kh,
    stride_kn,
    stride_oh,
    stride_on,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)  # b * HQ + h
    kv_h = (pid_h // HQ) * HKV + (pid_h % HQ) // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    d_valid = offs_d < HEAD_DIM
    q_ptr = Q + pid_h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
    q = tl.load(q_ptr, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    tin_q = tl.load(TIN + offs_m, mask=m_valid, other=-1)
    k_base = K + kv_h.to(tl.int64) * stride_kh
    v_base = V + kv_h.to(tl.int64) * stride_kh

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start = tl.load(OFFSETS + pid_m)
    end = tl.load(OFFSETS + pid_m + 1)
    for i in range(start, end):
        kt = tl.load(KEY_TILES + i)
        k, v, visible = _key_tile(
            k_base, v_base, TIN, TOUT, kt, tin_q, offs_d, d_valid, N, stride_kn, BLOCK_N, DOT_FP32
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptr = O + pid_h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_on + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + pid_h.to(tl.int64) * N + offs_m, m_i + tl.log2(l_safe), mask=m_valid)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _tree_attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    TIN,
    TOUT,
    Q_OFFSETS,
    Q_TILES,
    N,
    HQ,
    HKV,
    GROUP,
    qk_scale,
    sm_scale,
    stride_qh,
    stride_qn,
    stride_kh,
    stride_kn,
    stride_dh,
    stride_dn,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of one query head (fp32 [B*Hq, N, D]) for key tile program_id(0)."""
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    kv_h = (pid_h // HQ) * HKV + (pid_h % HQ) // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < N
    d_valid = offs_d < HEAD_DIM
    kv_off = kv_h.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    tin_k = tl.load(TIN + offs_n, mask=n_valid, other=2147483647)
    tout_k = tl.load(TOUT + offs_n, mask=n_valid, other=-2147483647)
    q_base = Q + pid_h.to(tl.int64) * stride_qh
    do_base = DO + pid_h.to(tl.int64) * stride_qh
    row_base = pid_h.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start = tl.load(Q_OFFSETS + pid_n)
    end = tl.load(Q_OFFSETS + pid_n + 1)
    for i in range(start, end):
        qt = tl.load(Q_TILES + i)
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < N
        q_off = offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(q_base + q_off, mask=q_mask, other=0.0)
        do = tl.load(do_base + q_off, mask=q_mask, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + row_base + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_valid, other=0.0)
        tin_q = tl.load(TIN + offs_m, mask=m_valid, other=-1)
        # transposed scores [BLOCK_N, BLOCK_M]: key rows, query columns
        visible = (tin_k[:, None] <= tin_q[None, :]) & (tin_q[None, :] < tout_k[:, None])
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pt = tl.where(visible, tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    d_off = pid_h.to(tl.int64) * stride_dh + offs_n[:, None].to(tl.int64) * stride_dn + offs_d[None, :]
    tl.store(DK + d_off, dk * sm_scale, mask=kv_mask)
    tl.store(DV + d_off, dv, mask=kv_mask)


@triton.jit
def _tree_attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    TIN,
    TOUT,
    OFFSETS,
    KEY_TILES,
    N,
    HQ,
    HKV,
    GROUP,
    qk_scale,
    sm_scale,
    stride_qh,
    stride_qn,
    stride_kh,
    stride_kn,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    kv_h = (pid_h // HQ) * HKV + (pid_h % HQ) // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    d_valid = offs_d < HEAD_DIM
    q_off = pid_h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = pid_h.to(tl.int64) * N + offs_m
    lse = tl.load(LSE + row, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + row, mask=m_valid, other=0.0)
    tin_q = tl.load(TIN + offs_m, mask=m_valid, other=-1)
    k_base = K + kv_h.to(tl.int64) * stride_kh
    v_base = V + kv_h.to(tl.int64) * stride_kh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start = tl.load(OFFSETS + pid_m)
    end = tl.load(OFFSETS + pid_m + 1)
    for i in range(start, end):
        kt = tl.load(KEY_TILES + i)
        k, v, visible = _key_tile(
            k_base, v_base, TIN, TOUT, kt, tin_q, offs_d, d_valid, N, stride_kn, BLOCK_N, DOT_FP32
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ------------------------------------------------------------------------------------------- host side
def block_config(head_dim: int, n: int) -> tuple[int, int]:
    """(block, num_warps): one tile size for queries and keys, so one skip list serves forward and backward."""
    if interpreting():
        return 16, 1
    block = 64 if n > 64 else max(16, triton.next_power_of_2(n))
    return block, (8 if head_dim > 64 else 4)


# ------------------------------------------------------------------------------------------- autograd
class TreeAttentionFunction(torch.autograd.Function):
    """``skip``: (tin, tout, offsets, key_tiles, q_offsets, q_tiles) on the inputs' device (int32, int32,
    int64, int32, int64, int32), kept on ``ctx`` (not saved tensors) for the backward."""

    @staticmethod
    def forward(ctx, query, key, value, skip, scale, block, num_warps):
        tin, tout, offsets, key_tiles = skip[:4]
        b, hq, n, d = query.shape
        hkv = key.shape[1]
        q = query.reshape(b * hq, n, d).contiguous()
        k = key.reshape(b * hkv, n, d).contiguous()
        v = value.reshape(b * hkv, n, d).contiguous()
        o = torch.empty_like(q)
        lse = torch.empty(b * hq, n, dtype=torch.float32, device=q.device)
        dot_fp32, precision = dot_modes(q.dtype)
        block_d = max(16, triton.next_power_of_2(d))
        grid = (triton.cdiv(n, block), b * hq)
        _tree_attn_fwd[grid](
            q,
            k,
            v,
            o,
            lse,
            tin,
            tout,
            offsets,
            key_tiles,
            n,
            hq,
            hkv,
            hq // hkv,
            scale * LOG2E,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            o.stride(0),
            o.stride(1),
            HEAD_DIM=d,
            BLOCK_D=block_d,
            BLOCK_M=block,
            BLOCK_N=block,
            DOT_FP32=dot_fp32,
            PRECISION=precision,
            num_warps=num_warps,
        )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.skip, ctx.scale, ctx.block, ctx.num_warps = skip, scale, block, num_warps
        ctx.shape = (b, hq, hkv, n, d)
        return o.view(b, hq, n, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, o, lse = ctx.saved_tensors
        b, hq, hkv, n, d = ctx.shape
        tin, tout, offsets, key_tiles, q_offsets, q_tiles = ctx.skip
        block, scale = ctx.block, ctx.scale
        do = grad_out.reshape(b * hq, n, d).contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()  # [B*Hq, N]
        dot_fp32, precision = dot_modes(q.dtype)
        block_d = max(16, triton.next_power_of_2(d))
        group = hq // hkv
        dk = torch.empty(b * hq, n, d, dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
        dq = torch.empty_like(q)
        num_tiles = triton.cdiv(n, block)
        common = dict(
            HEAD_DIM=d,
            BLOCK_D=block_d,
            BLOCK_M=block,
            BLOCK_N=block,
            DOT_FP32=dot_fp32,
            PRECISION=precision,
            num_warps=ctx.num_warps,
        )
        _tree_attn_bwd_dkdv[(num_tiles, b * hq)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            tin,
            tout,
            q_offsets,
            q_tiles,
            n,
            hq,
            hkv,
            group,
            scale * LOG2E,
            scale,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            dk.stride(0),
            dk.stride(1),
            **common,
        )
        _tree_attn_bwd_dq[(num_tiles, b * hq)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            tin,
            tout,
            offsets,
            key_tiles,
            n,
            hq,
            hkv,
            group,
            scale * LOG2E,
            scale,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            **common,
        )
        dk = dk.view(b, hkv, group, n, d).sum(2).to(k.dtype)
        dv = dv.view(b, hkv, group, n, d).sum(2).to(v.dtype)
        return dq.view(b, hq, n, d), dk, dv, None, None, None, None


def triton_tree_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tin: torch.Tensor,
    tout: torch.Tensor,
    offsets: torch.Tensor,
    key_tiles: torch.Tensor,
    q_offsets: torch.Tensor,
    q_tiles: torch.Tensor,
    block: int,
    scale: float | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """query [B, Hq, N, D], key/value [B, Hkv, N, D] -> [B, Hq, N, D]; the layout of ``sdpa_tree_attention``.

    ``tin``/``tout`` [N]: the tokens' intervals. The skip list of tiles of ``block`` rows (queries and keys
    alike): ``offsets`` [ceil(N / block) + 1] and ``key_tiles``, the key tiles of query tile i being
    ``key_tiles[offsets[i]:offsets[i + 1]]`` (every tile holding a visible pair, ascending); ``q_offsets`` and
    ``q_tiles``, its transpose (the query tiles of each key tile, ascending), for the dK/dV backward.
    ``num_warps`` defaults to ``block_config``'s."""
    b, hq, n, d = query.shape
    if key.shape[1] == 0 or hq % key.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({key.shape[1]})")
    if tin.numel() != n or tout.numel() != n:
        raise ValueError(f"tin/tout have {tin.numel()}/{tout.numel()} entries for {n} tokens")
    if n == 0:
        return query.new_empty(query.shape)
    num_tiles = -(-n // block)
    if offsets.numel() != num_tiles + 1 or q_offsets.numel() != num_tiles + 1:
        raise ValueError(
            f"skip lists of {offsets.numel() - 1}/{q_offsets.numel() - 1} tiles for {num_tiles} tiles of {block} rows"
        )
    if num_warps is None:
        num_warps = block_config(d, n)[1]
    scale = d**-0.5 if scale is None else float(scale)
    dev = query.device
    skip = (
        tin.to(device=dev, dtype=torch.int32).contiguous(),
        tout.to(device=dev, dtype=torch.int32).contiguous(),
        offsets.to(device=dev, dtype=torch.int64).contiguous(),
        key_tiles.to(device=dev, dtype=torch.int32).contiguous(),
        q_offsets.to(device=dev, dtype=torch.int64).contiguous(),
        q_tiles.to(device=dev, dtype=torch.int32).contiguous(),
    )
    return TreeAttentionFunction.apply(query, key, value, skip, scale, block, num_warps)
