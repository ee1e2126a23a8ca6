"""Paged decode attention in Triton: one new query token per sequence, K/V read from the engine's pool.

The pool keeps every layer's K/V as ``[slots, Hkv, D]``; a sequence's keys are the slots of its path
(``kv_slots[b, :kv_len[b]]``, a padded block table of int64 slot ids; several rows may list the same
slots, siblings of a tree share their ancestors' pages). One kernel serves every case:

* ``_paged_attn_fwd``: one program per (key list, KV head, query tile, split). A *key list* is a row of a
  slot table with a range ``[kstart, kend)`` of it; its *query rows* are ``qidx[qstart[l]:qstart[l+1]]``
  (rows of the query tensor ``[R, Hq, D]``). The program's query tile is the flattened
  (query row, query head of the KV head's group) pairs, so K/V tiles are loaded once for all the
  grouped-query heads (GQA) and, in the cascade, for all siblings. Online softmax in fp32 (base 2);
  the program writes its partial output, normalised over its own keys (fp32), and its natural-log log-sum-exp.
  Split-K: the key range is cut into ``splits`` chunks (one program each), merged afterwards.
* plain decode (``paged_decode_attention``): one key list per sequence, ``[0, kv_len)``, one query row.
* cascade / DeFT-Hydragen (``cascade_decode_attention``): sequences in groups share their first
  ``prefix_len[g]`` slots; the prefix is read once per group for the matrix of the group's queries
  (one key list per group, many query rows), each sequence's suffix ``[prefix_len, kv_len)`` separately,
  and the two partial results are merged exactly with their log-sum-exps (``merge_attention_states``).

* cascade with the groups precomputed (``cascade_decode_grouped``): ``kv_slots`` are already each sequence's
  suffix and the groups' query rows come as a CSR (``members``, ``member_start``), built once by the caller
  for all layers (no host sync per layer).

The kernels take tensors only; the engine's "triton" paged backend, which turns its metadata into these calls
(and falls back to the PyTorch path for prefill), is ``treerpo.attention.triton_backends``.

Dots run on the query dtype (fp16/bf16 operands, fp32 accumulation) on a GPU, exact fp32 for fp32, and
fp32 for bf16 under ``TRITON_INTERPRET=1`` (the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_modes, interpreting

__all__ = [
    "paged_decode_attention",
    "cascade_decode_attention",
    "cascade_decode_grouped",
    "merge_attention_states",
    "merge_two",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp2(-inf - _NEG) = 0, never NaN
EMPTY_LSE = -1.0e30 * LN2  # natural-log LSE of a partial that saw no key (its weight in a merge is 0)


@triton.jit
def _paged_attn_fwd(
    Q,
    K,
    V,
    SLOTS,
    KSTART,
    KEND,
    QSTART,
    QIDX,
    O,
    LSE,
    GROUP,
    chunk,
    num_q_tiles,
    qk_scale,
    stride_qr,
    stride_qh,
    stride_sl,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_os,
    stride_or,
    stride_oh,
    stride_ls,
    stride_lr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    lst = tl.program_id(0)
    pid1 = tl.program_id(1)  # kv_head * num_q_tiles + q_tile
    split = tl.program_id(2)
    kv_h = pid1 // num_q_tiles
    q_tile = pid1 % num_q_tiles
    q_lo = tl.load(QSTART + lst)
    n_rows = tl.load(QSTART + lst + 1) - q_lo
    if q_tile * BLOCK_M < n_rows * GROUP:
        offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        j = offs_m // GROUP
        head = kv_h * GROUP + offs_m % GROUP
        m_valid = j < n_rows
        row = tl.load(QIDX + q_lo + j, mask=m_valid, other=0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(
            Q + row[:, None] * stride_qr + head[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
            mask=q_mask,
            other=0.0,
        )
        if DOT_FP32:
            q = q.to(tl.float32)

        k_lo = tl.load(KSTART + lst)
        k_hi = tl.load(KEND + lst)
        lo = k_lo + split * chunk
        hi = tl.minimum(k_hi, lo + chunk)
        slot_base = SLOTS + lst.to(tl.int64) * stride_sl
        k_base = K + kv_h.to(tl.int64) * stride_kh
        v_base = V + kv_h.to(tl.int64) * stride_vh

        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_valid = offs_n < hi
            slot = tl.load(slot_base + offs_n, mask=n_valid, other=0).to(tl.int64)
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            k = k.to(q.dtype)
            v = v.to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptr = (
            O
            + split.to(tl.int64) * stride_os
            + row[:, None] * stride_or
            + head[:, None].to(tl.int64) * stride_oh
            + offs_d[None, :]
        )
        tl.store(o_ptr, out, mask=q_mask)
        lse_ptr = LSE + split.to(tl.int64) * stride_ls + row * stride_lr + head
        tl.store(lse_ptr, (m_i + tl.log2(l_safe)) * 0.6931471805599453, mask=m_valid)


# ------------------------------------------------------------------------------------------- host side
def merge_attention_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partial attentions over disjoint key sets along dim 0.

    ``outs`` [S, ..., D] (each normalised over its own keys), ``lses`` [S, ...] (natural log) ->
    (out [..., D] fp32, lse [...]): ``out = sum_s exp(lse_s - m) o_s / sum_s exp(lse_s - m)``. A partial
    with no key (lse = ``EMPTY_LSE`` or -inf) has weight 0."""
    lses = lses.float()
    m = lses.max(0).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m)  # [S, ...]
    total = w.sum(0)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (w.unsqueeze(-1) * outs.float()).sum(0) / safe.unsqueeze(-1)
    return out, m + torch.log(safe)


def merge_two(o1, lse1, o2, lse2):
    """``merge_attention_states`` of two partials."""
    return merge_attention_states(torch.stack((o1.float(), o2.float())), torch.stack((lse1.float(), lse2.float())))


def _configs(head_dim: int):
    """(BLOCK_N, num_warps)."""
    if interpreting():
        return 16, 4
    return (64 if head_dim <= 128 else 32), 4


def _num_splits(max_keys: int, programs: int, block_n: int, splits: int | None) -> int:
    if splits is not None:
        return max(1, int(splits))
    if interpreting():
        return 1
    # enough programs to fill the GPU (~2 waves of 132 SMs), at least 256 keys per split
    want = max(1, (2 * 132) // max(1, programs))
    return max(1, min(want, triton.cdiv(max_keys, 256)))


def _partial_attention(
    q, k_cache, v_cache, slots, kstart, kend, qstart, qidx, max_rows, scale, splits, max_keys, out=None, lse=None
):
    """Run ``_paged_attn_fwd``: partial outputs fp32 [S, R, Hq, D] and natural LSE [S, R, Hq]."""
    r, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    block_n, num_warps = _configs(d)
    block_d = max(16, triton.next_power_of_2(d))
    block_m = max(16, min(64, triton.next_power_of_2(max(1, max_rows * group))))
    num_q_tiles = max(1, triton.cdiv(max_rows * group, block_m))
    n_lists = slots.shape[0]
    splits = _num_splits(max_keys, n_lists * hkv * num_q_tiles, block_n, splits)
    chunk = triton.cdiv(triton.cdiv(max(1, max_keys), splits), block_n) * block_n
    if out is None:
        out = torch.zeros(splits, r, hq, d, dtype=torch.float32, device=q.device)
        lse = torch.full((splits, r, hq), EMPTY_LSE, dtype=torch.float32, device=q.device)
    if n_lists == 0:
        return out, lse
    dot_fp32, precision = dot_modes(q.dtype)
    grid = (n_lists, hkv * num_q_tiles, splits)
    _paged_attn_fwd[grid](
        q,
        k_cache,
        v_cache,
        slots,
        kstart,
        kend,
        qstart,
        qidx,
        out,
        lse,
        group,
        chunk,
        num_q_tiles,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        slots.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_FP32=dot_fp32,
        PRECISION=precision,
        num_warps=num_warps,
    )
    return out, lse


def _check(q, k_cache, v_cache, kv_slots):
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"expected query [B, Hq, D] and K/V caches [slots, Hkv, D]; got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    hq, hkv = q.shape[1], k_cache.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"query head dim {q.shape[2]} != cache head dim {k_cache.shape[2]}")
    if kv_slots.dim() != 2 or kv_slots.shape[0] != q.shape[0]:
        raise ValueError(f"kv_slots must be [B, K] with B = {q.shape[0]}; got {tuple(kv_slots.shape)}")
    if k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("K/V caches need a contiguous last dim")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float | None = None,
    splits: int | None = None,
    return_lse: bool = False,
):
    """q [B, Hq, D]; k_cache/v_cache [slots, Hkv, D]; kv_slots int64 [B, K] (row b's keys are
    ``kv_slots[b, :kv_len[b]]``) -> out [B, Hq, D] in q's dtype (and the natural-log LSE [B, Hq], fp32).

    ``splits`` forces the number of split-K chunks (default: a heuristic, 1 under the interpreter)."""
    _check(q, k_cache, v_cache, kv_slots)
    b, hq, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    q = q if q.stride(2) == 1 else q.contiguous()
    kv_slots = kv_slots.to(torch.int64).contiguous()
    kv_len = kv_len.to(device=q.device, dtype=torch.int64).contiguous()
    ar = torch.arange(b + 1, device=q.device, dtype=torch.int64)
    out, lse = _partial_attention(
        q,
        k_cache,
        v_cache,
        kv_slots,
        torch.zeros_like(kv_len),
        kv_len,
        ar,
        ar[:-1].contiguous(),
        1,
        scale,
        splits,
        kv_slots.shape[1],
    )
    if out.shape[0] == 1:
        o, l = out[0], lse[0]
    else:
        o, l = merge_attention_states(out, lse)
    o = o.to(q.dtype)
    return (o, l) if return_lse else o


def cascade_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_len: torch.Tensor,
    prefix_slots: torch.Tensor,
    prefix_len: torch.Tensor,
    group_of_seq: torch.Tensor,
    scale: float | None = None,
    splits: int | None = None,
    return_lse: bool = False,
):
    """Decode attention with shared prefixes computed once per group (Hydragen / DeFT style).

    ``prefix_slots`` int64 [G, P] and ``prefix_len`` [G]: group g's shared prefix; ``group_of_seq`` [B]
    (-1: no group). Sequence b in group g must have ``kv_slots[b, :prefix_len[g]] == prefix_slots[g,
    :prefix_len[g]]`` (not checked) and ``kv_len[b] >= prefix_len[g]``. The prefix partial (all queries of the
    group against the prefix, one program reads each K/V tile once for the group) and the suffix partial
    (``kv_slots[b, prefix_len:kv_len]``) are merged with their log-sum-exps. Same output as
    ``paged_decode_attention``."""
    _check(q, k_cache, v_cache, kv_slots)
    b, hq, d = q.shape
    dev = q.device
    scale = d**-0.5 if scale is None else float(scale)
    q = q if q.stride(2) == 1 else q.contiguous()
    kv_slots = kv_slots.to(torch.int64).contiguous()
    kv_len = kv_len.to(device=dev, dtype=torch.int64).contiguous()
    prefix_slots = prefix_slots.to(device=dev, dtype=torch.int64).contiguous()
    prefix_len = prefix_len.to(device=dev, dtype=torch.int64).contiguous()
    group_of_seq = group_of_seq.to(device=dev, dtype=torch.int64)
    n_groups = prefix_slots.shape[0]
    in_group = group_of_seq >= 0
    # suffix: [prefix_len[g], kv_len) of every sequence (the whole path for ungrouped ones)
    gsafe = group_of_seq.clamp(min=0)
    kstart = torch.where(
        in_group, prefix_len[gsafe] if n_groups else torch.zeros_like(kv_len), torch.zeros_like(kv_len)
    ).contiguous()
    ar = torch.arange(b + 1, device=dev, dtype=torch.int64)
    suf_o, suf_l = _partial_attention(
        q, k_cache, v_cache, kv_slots, kstart, kv_len, ar, ar[:-1].contiguous(), 1, scale, splits, kv_slots.shape[1]
    )
    if n_groups == 0 or not bool(in_group.any()):
        o, l = merge_attention_states(suf_o, suf_l) if suf_o.shape[0] > 1 else (suf_o[0], suf_l[0])
        o = o.to(q.dtype)
        return (o, l) if return_lse else o
    # prefix: one key list per group, its query rows the group's sequences
    grouped = torch.nonzero(in_group).flatten()
    order = grouped[torch.argsort(group_of_seq[grouped], stable=True)]
    counts = torch.bincount(group_of_seq[grouped], minlength=n_groups)
    qstart = torch.cat((counts.new_zeros(1), torch.cumsum(counts, 0))).contiguous()
    o, l = _merge_with_prefix(
        q,
        k_cache,
        v_cache,
        suf_o,
        suf_l,
        prefix_slots,
        prefix_len,
        order.contiguous(),
        qstart,
        int(counts.max()),
        scale,
        splits,
    )
    o = o.to(q.dtype)
    return (o, l) if return_lse else o


def _merge_with_prefix(
    q, k_cache, v_cache, suf_o, suf_l, prefix_slots, prefix_len, members, member_start, max_members, scale, splits
):
    """The prefix partial (group g's query rows ``members[member_start[g]:member_start[g + 1]]`` against its
    ``prefix_slots[g, :prefix_len[g]]``, each K/V tile read once for the group) merged with the suffix partials."""
    pre_o, pre_l = _partial_attention(
        q,
        k_cache,
        v_cache,
        prefix_slots,
        torch.zeros_like(prefix_len),
        prefix_len,
        member_start,
        members,
        max_members,
        scale,
        splits,
        prefix_slots.shape[1],
    )
    return merge_attention_states(torch.cat((suf_o, pre_o)), torch.cat((suf_l, pre_l)))


def cascade_decode_grouped(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_len: torch.Tensor,
    prefix_slots: torch.Tensor,
    prefix_len: torch.Tensor,
    members: torch.Tensor,
    member_start: torch.Tensor,
    max_members: int,
    scale: float | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """The cascade with its groups precomputed: ``kv_slots[b, :kv_len[b]]`` are sequence b's keys after its
    group's prefix (its whole path when it is in no group); group g's prefix is ``prefix_slots[g,
    :prefix_len[g]]`` and its query rows ``members[member_start[g]:member_start[g + 1]]``, at most
    ``max_members`` of them (a host int: no device sync). -> out [B, Hq, D] in q's dtype."""
    _check(q, k_cache, v_cache, kv_slots)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    q = q if q.stride(2) == 1 else q.contiguous()
    b = q.shape[0]
    ar = torch.arange(b + 1, device=q.device, dtype=torch.int64)
    kv_len = kv_len.contiguous()
    suf_o, suf_l = _partial_attention(
        q,
        k_cache,
        v_cache,
        kv_slots,
        torch.zeros_like(kv_len),
        kv_len,
        ar,
        ar[:-1].contiguous(),
        1,
        scale,
        splits=splits,
        max_keys=kv_slots.shape[1],
    )
    out, _ = _merge_with_prefix(
        q, k_cache, v_cache, suf_o, suf_l, prefix_slots, prefix_len, members, member_start, max_members, scale, splits
    )
    return out.to(q.dtype)
