"""Tree attention in Triton: flash-style forward and backward over the key tiles of a skip list.

Token q sees token k iff ``tin[k] <= tin[q] < tout[k]`` (k is an ancestor-or-self of q in a packed
depth-first batch). This module knows nothing of trees beyond ``tin``/``tout``: the caller
(``treerpo.attention.triton_backends``) passes, as tensors, the skip lists of the tiles
(``treerpo.trees.tile_skip``, computed once per batch and shared by every head and layer), for the tile shapes
of ``tile_configs.TreeTiles``.

Grouped-query packing: a query tile is ``block_m`` lanes holding ``rows = block_m // group`` query rows times
the ``group`` query heads that read one KV head, so each program reads a K/V tile once for its whole group
(and the dK/dV program sums the group's contributions in its fp32 accumulators, written once in the input
dtype). The kernels visit only the listed tiles:

* forward: one program per (query tile, batch x KV head); online softmax in fp32 (base 2); the output and
  the log-sum-exp (base 2, per row and head) are stored for the backward;
* backward (FlashAttention-2): ``delta = rowsum(dO * O)`` (a small kernel); one program per (key tile,
  batch x KV head) walks the query tiles that see its key tile (the transposed skip list) and accumulates
  dK, dV; one program per (query tile, batch x KV head) walks the key tiles and accumulates dQ.

Inputs are read through their strides (the last dim contiguous), so the transposed views a model produces
are not copied. Dots run on the input dtype (fp16/bf16, fp32 accumulation) on a GPU, and on fp32 for fp32
inputs and under ``TRITON_INTERPRET=1`` for bf16 (the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_modes, head_dim_mask
from .tile_configs import TreeTiles

__all__ = ["triton_tree_attention", "TreeAttentionFunction", "check_inputs", "tree_attention_forward"]

LOG2E = 1.4426950408889634
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp2(-inf - _NEG) = 0, never NaN


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _lanes(tile, ROWS, GROUP, N, BLOCK: tl.constexpr):
    """Query tile ``tile`` as ``BLOCK`` lanes: (row, head within the group, valid), ``ROWS`` rows of
    ``GROUP`` heads; lanes past ``ROWS * GROUP`` or past the last row are invalid."""
    lane = tl.arange(0, BLOCK)
    j = lane // GROUP
    row = tile * ROWS + j
    return row, lane % GROUP, (j < ROWS) & (row < N)


@triton.jit
def _key_tile(
    k_base,
    v_base,
    TIN,
    TOUT,
    kt,
    tin_q,
    offs_d,
    d_valid,
    N,
    stride_kn,
    stride_vn,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """K and V of key tile ``kt`` and which of its keys each query lane (``tin_q``) sees: [lanes, BLOCK_N]."""
    offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    kv_mask = n_valid[:, None] & d_valid[None, :]
    rows = offs_n[:, None].to(tl.int64)
    k = tl.load(k_base + rows * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + rows * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    tin_k = tl.load(TIN + offs_n, mask=n_valid, other=2147483647)
    tout_k = tl.load(TOUT + offs_n, mask=n_valid, other=-2147483647)
    visible = (tin_k[None, :] <= tin_q[:, None]) & (tin_q[:, None] < tout_k[None, :])
    return k, v, visible


# ----------------------------------------------------------------------------------------------- forward
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
    ROWS,
    qk_scale,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    so_b,
    so_h,
    so_n,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)  # b * HKV + kv head
    b = (pid_bh // HKV).to(tl.int64)
    kv_h = pid_bh % HKV
    row, hh, m_valid = _lanes(pid_m, ROWS, GROUP, N, BLOCK_M)
    head = (kv_h * GROUP + hh).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    q_mask = m_valid[:, None] & d_valid[None, :]
    row64 = row.to(tl.int64)
    q_off = b * sq_b + head[:, None] * sq_h + row64[:, None] * sq_n + offs_d[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    tin_q = tl.load(TIN + row, mask=m_valid, other=-1)
    k_base = K + b * sk_b + kv_h.to(tl.int64) * sk_h
    v_base = V + b * sv_b + kv_h.to(tl.int64) * sv_h

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start = tl.load(OFFSETS + pid_m)
    end = tl.load(OFFSETS + pid_m + 1)
    for i in range(start, end):
        kt = tl.load(KEY_TILES + i)
        k, v, visible = _key_tile(
            k_base, v_base, TIN, TOUT, kt, tin_q, offs_d, d_valid, N, sk_n, sv_n, BLOCK_N, DOT_FP32
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
    o_off = b * so_b + head[:, None] * so_h + row64[:, None] * so_n + offs_d[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + (b * HQ + head) * N + row64, m_i + tl.log2(l_safe), mask=m_valid)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _tree_attn_bwd_delta(
    O, DO, DELTA, N, HQ, so_b, so_h, so_n, sd_b, sd_h, sd_n,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """delta[b, h, n] = sum_d dO * O (fp32), for ``BLOCK`` rows of one (batch, query head)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)  # b * HQ + head
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    r64 = rows[:, None].to(tl.int64)
    o = tl.load(O + b * so_b + h * so_h + r64 * so_n + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sd_b + h * sd_h + r64 * sd_n + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + rows, delta, mask=rows < N)


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
    ROWS,
    qk_scale,
    sm_scale,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sdo_b,
    sdo_h,
    sdo_n,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of key tile program_id(0) of one (batch, KV head), summed over the group's query heads."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    kv_h = (pid_bh % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < N
    d_valid = head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    kv_mask = n_valid[:, None] & d_valid[None, :]
    n64 = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b * sk_b + kv_h * sk_h + n64 * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + kv_h * sv_h + n64 * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    tin_k = tl.load(TIN + offs_n, mask=n_valid, other=2147483647)
    tout_k = tl.load(TOUT + offs_n, mask=n_valid, other=-2147483647)
    # a lane's place within a query tile as int32 offsets (one vector each, live through the loop; int64
    # per-lane head offsets spill), the tile's own place as int64 scalars
    lane = tl.arange(0, BLOCK_M)
    j = lane // GROUP
    hh = lane % GROUP
    q_lane = hh * sq_h + j * sq_n
    do_lane = hh * sdo_h + j * sdo_n
    row_lane = hh * N + j
    head0 = kv_h * GROUP
    q_head = Q + b * sq_b + head0 * sq_h
    do_head = DO + b * sdo_b + head0 * sdo_h
    row_head = (b * HQ + head0) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start = tl.load(Q_OFFSETS + pid_n)
    end = tl.load(Q_OFFSETS + pid_n + 1)
    for i in range(start, end):
        qt = tl.load(Q_TILES + i)
        row0 = (qt * ROWS).to(tl.int64)
        row = qt * ROWS + j
        m_valid = (j < ROWS) & (row < N)
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(q_head + row0 * sq_n + q_lane[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_head + row0 * sdo_n + do_lane[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + row_head + row0 + row_lane, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + row_head + row0 + row_lane, mask=m_valid, other=0.0)
        tin_q = tl.load(TIN + row, mask=m_valid, other=-1)
        # transposed scores [BLOCK_N, BLOCK_M]: key rows, query lanes
        visible = (tin_k[:, None] <= tin_q[None, :]) & (tin_q[None, :] < tout_k[:, None])
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pt = tl.where(visible, tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    # offsets and mask recomputed here, not kept from the loads: [BLOCK_N, BLOCK_D] tiles live through the
    # loop spill
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n < N)[:, None] & head_dim_mask(tl.arange(0, BLOCK_D), HEAD_DIM, BLOCK_D)[None, :]
    n64 = offs_n[:, None].to(tl.int64)
    dk_ptr = DK + b * sk_b + kv_h * sk_h + n64 * sk_n + offs_d[None, :]
    tl.store(dk_ptr, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sv_b + kv_h * sv_h + n64 * sv_n + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


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
    ROWS,
    qk_scale,
    sm_scale,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sdo_b,
    sdo_h,
    sdo_n,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of query tile program_id(0) of one (batch, KV head); ``DQ`` has ``Q``'s strides."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    kv_h = pid_bh % HKV
    row, hh, m_valid = _lanes(pid_m, ROWS, GROUP, N, BLOCK_M)
    head = (kv_h * GROUP + hh).to(tl.int64)
    row64 = row.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * sq_b + head[:, None] * sq_h + row64[:, None] * sq_n + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(
        DO + b * sdo_b + head[:, None] * sdo_h + row64[:, None] * sdo_n + offs_d[None, :], mask=q_mask, other=0.0
    )
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + (b * HQ + head) * N + row64, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + (b * HQ + head) * N + row64, mask=m_valid, other=0.0)
    tin_q = tl.load(TIN + row, mask=m_valid, other=-1)
    k_base = K + b * sk_b + kv_h.to(tl.int64) * sk_h
    v_base = V + b * sv_b + kv_h.to(tl.int64) * sv_h

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start = tl.load(OFFSETS + pid_m)
    end = tl.load(OFFSETS + pid_m + 1)
    for i in range(start, end):
        kt = tl.load(KEY_TILES + i)
        k, v, visible = _key_tile(
            k_base, v_base, TIN, TOUT, kt, tin_q, offs_d, d_valid, N, sk_n, sv_n, BLOCK_N, DOT_FP32
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq_ptr = DQ + b * sq_b + head[:, None] * sq_h + row64[:, None] * sq_n + offs_d[None, :]  # recomputed: see dK/dV
    tl.store(dq_ptr, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ------------------------------------------------------------------------------------------- host side
def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _dense(x: torch.Tensor) -> bool:
    """Strides of some permutation of a contiguous tensor (no gaps, no overlap): ``empty_like`` then keeps them."""
    expected = 1
    for dim in sorted(range(x.dim()), key=x.stride):
        if x.shape[dim] != 1 and x.stride(dim) != expected:
            return False
        expected *= x.shape[dim]
    return True


def _readable(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernels take it: last dim contiguous and no gaps (e.g. a slice of a fused qkv projection, whose
    gradient ``empty_like`` would lay out densely while the kernels wrote it with the slice's strides), else a copy."""
    return x if (x.stride(3) == 1 or x.shape[3] == 1) and _dense(x) else x.contiguous()


def _meta(query: torch.Tensor, key: torch.Tensor, tiles: TreeTiles):
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    dot_fp32, precision = dot_modes(query.dtype)
    consts = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), DOT_FP32=dot_fp32, PRECISION=precision)
    return b, hq, hkv, n, d, group, consts


def tree_attention_forward(query, key, value, tin, tout, skip, tiles: TreeTiles, scale: float):
    """The forward kernel alone: (out with ``query``'s strides, lse fp32 [B, Hq, N] base 2).
    ``skip``: (offsets, key_tiles) for query tiles of ``tiles.fwd.rows(group)`` rows."""
    b, hq, hkv, n, d, group, consts = _meta(query, key, tiles)
    cfg = tiles.fwd
    rows = cfg.rows(group)
    out = torch.empty_like(query)
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=query.device)
    _tree_attn_fwd[(triton.cdiv(n, rows), b * hkv)](
        query, key, value, out, lse, tin, tout, skip[0], skip[1],
        n, hq, hkv, group, rows, scale * LOG2E,
        *_strides(query), *_strides(key), *_strides(value), *_strides(out),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **consts,
    )  # fmt: skip
    return out, lse


def tree_attention_backward(query, key, value, out, lse, grad_out, tin, tout, dkdv_skip, dq_skip, tiles, scale):
    """(dq, dk, dv) in the inputs' dtypes and layouts. ``dkdv_skip``: (q_offsets, q_tiles), the query tiles of
    ``tiles.dkdv.rows(group)`` rows of each key tile of ``tiles.dkdv.block_n`` rows; ``dq_skip``: (offsets,
    key_tiles) for ``tiles.dq``."""
    b, hq, hkv, n, d, group, consts = _meta(query, key, tiles)
    delta = torch.empty(b, hq, n, dtype=torch.float32, device=query.device)
    rows_delta = 64
    _tree_attn_bwd_delta[(triton.cdiv(n, rows_delta), b * hq)](
        out, grad_out, delta, n, hq, *_strides(out), *_strides(grad_out),
        HEAD_DIM=d, BLOCK_D=consts["BLOCK_D"], BLOCK=rows_delta, num_warps=4,
    )  # fmt: skip
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    shared = (n, hq, hkv, group)
    strides = (*_strides(query), *_strides(key), *_strides(value), *_strides(grad_out))
    kv_cfg, q_cfg = tiles.dkdv, tiles.dq
    _tree_attn_bwd_dkdv[(triton.cdiv(n, kv_cfg.block_n), b * hkv)](
        query, key, value, grad_out, lse, delta, dk, dv, tin, tout, dkdv_skip[0], dkdv_skip[1],
        *shared, kv_cfg.rows(group), scale * LOG2E, scale, *strides,
        BLOCK_M=kv_cfg.block_m, BLOCK_N=kv_cfg.block_n, num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
        **consts,
    )  # fmt: skip
    q_rows = q_cfg.rows(group)
    _tree_attn_bwd_dq[(triton.cdiv(n, q_rows), b * hkv)](
        query, key, value, grad_out, lse, delta, dq, tin, tout, dq_skip[0], dq_skip[1],
        *shared, q_rows, scale * LOG2E, scale, *strides,
        BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n, num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
        **consts,
    )  # fmt: skip
    return dq, dk, dv


# ------------------------------------------------------------------------------------------- autograd
class TreeAttentionFunction(torch.autograd.Function):
    """``skips``: (tin, tout, fwd (offsets, key_tiles), dkdv (q_offsets, q_tiles), dq (offsets, key_tiles)) on
    the inputs' device, kept on ``ctx`` (not saved tensors) for the backward."""

    @staticmethod
    def forward(ctx, query, key, value, skips, tiles, scale):
        tin, tout, fwd_skip = skips[:3]
        query, key, value = (_readable(x) for x in (query, key, value))
        out, lse = tree_attention_forward(query, key, value, tin, tout, fwd_skip, tiles, scale)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.skips, ctx.tiles, ctx.scale = skips, tiles, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        tin, tout, _, dkdv_skip, dq_skip = ctx.skips
        grads = tree_attention_backward(
            query, key, value, out, lse, _readable(grad_out), tin, tout, dkdv_skip, dq_skip,
            ctx.tiles, ctx.scale,
        )  # fmt: skip
        return (*grads, None, None, None)


def _check_skip(name: str, offsets: torch.Tensor, tiles_needed: int) -> None:
    if offsets.numel() != tiles_needed + 1:
        raise ValueError(f"the {name} skip list has {offsets.numel() - 1} tiles where {tiles_needed} are needed")


def check_inputs(query: torch.Tensor, key: torch.Tensor, tin: torch.Tensor, tout: torch.Tensor) -> None:
    """Heads and intervals that fit the query, refused with what is wrong."""
    hq, n = query.shape[1], query.shape[2]
    hkv = key.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if tin.numel() != n or tout.numel() != n:
        raise ValueError(f"tin/tout have {tin.numel()}/{tout.numel()} entries for {n} tokens")


def triton_tree_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tin: torch.Tensor,
    tout: torch.Tensor,
    fwd_skip: tuple[torch.Tensor, torch.Tensor],
    dkdv_skip: tuple[torch.Tensor, torch.Tensor],
    dq_skip: tuple[torch.Tensor, torch.Tensor],
    tiles: TreeTiles,
    scale: float | None = None,
) -> torch.Tensor:
    """query [B, Hq, N, D], key/value [B, Hkv, N, D] (any strides, last dim contiguous) -> [B, Hq, N, D] with
    ``query``'s layout; the result of ``sdpa_tree_attention``.

    ``tin``/``tout`` [N] int32: the tokens' intervals. ``tiles`` (``tile_configs.tree_tiles``): the three
    kernels' configurations, already widened for the group (``TreeTiles.for_group``). Skip lists (int64
    offsets, int32 tiles), for query tiles of ``tiles.X.rows(group)`` rows and key tiles of ``tiles.X.block_n``:
    ``fwd_skip`` and ``dq_skip`` by query tile (key tiles ascending), ``dkdv_skip`` by key tile (query tiles
    ascending)."""
    check_inputs(query, key, tin, tout)
    b, hq, n, d = query.shape
    if n == 0:
        return query.new_empty(query.shape)
    group = hq // key.shape[1]
    if any(cfg.block_m < group for cfg in tiles.as_tuple()):
        raise ValueError(
            f"tiles of {tiles} hold fewer lanes than the {group} query heads of a KV head: pass tiles.for_group(group)"
        )
    _check_skip("forward", fwd_skip[0], -(-n // tiles.fwd.rows(group)))
    _check_skip("dQ", dq_skip[0], -(-n // tiles.dq.rows(group)))
    _check_skip("dK/dV", dkdv_skip[0], -(-n // tiles.dkdv.block_n))
    scale = d**-0.5 if scale is None else float(scale)
    return TreeAttentionFunction.apply(query, key, value, (tin, tout, fwd_skip, dkdv_skip, dq_skip), tiles, scale)
