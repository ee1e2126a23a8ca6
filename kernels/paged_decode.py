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

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import dot_modes, head_dim_mask, interpreting

__all__ = [
    "paged_decode_attention",
    "cascade_decode_attention",
    "cascade_decode_grouped",
    "merge_attention_states",
    "merge_partials",
    "merge_two",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp2(-inf - _NEG) = 0, never NaN
EMPTY_LSE = -1.0e30 * LN2  # natural-log LSE of a partial that saw no key (its weight in a merge is 0)
_EMPTY_HALF = tl.constexpr(-0.5e30 * LN2)  # any LSE below it is an empty partial
EMPTY_LSE_VALUE = tl.constexpr(EMPTY_LSE)


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
    k_hi = tl.load(KEND + lst)
    lo = tl.load(KSTART + lst) + split * chunk
    hi = tl.minimum(k_hi, lo + chunk)
    # a split past this list's own keys (split-K is sized for the longest list) loads nothing and stores only
    # its rows' empty LSE (weight 0 in the merge; the output, unwritten, is never read)
    if (q_tile * BLOCK_M < n_rows * GROUP) & (lo >= hi):
        offs_e = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        e_valid = offs_e // GROUP < n_rows
        e_row = tl.load(QIDX + q_lo + offs_e // GROUP, mask=e_valid, other=0).to(tl.int64)
        e_head = kv_h * GROUP + offs_e % GROUP
        e_ptr = LSE + split.to(tl.int64) * stride_ls + e_row * stride_lr + e_head
        tl.store(e_ptr, tl.zeros([BLOCK_M], dtype=tl.float32) + EMPTY_LSE_VALUE, mask=e_valid)
    if (q_tile * BLOCK_M < n_rows * GROUP) & (lo < hi):
        offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        j = offs_m // GROUP
        head = kv_h * GROUP + offs_m % GROUP
        m_valid = j < n_rows
        row = tl.load(QIDX + q_lo + j, mask=m_valid, other=0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(
            Q + row[:, None] * stride_qr + head[:, None].to(tl.int64) * stride_qh + offs_d[None, :],
            mask=q_mask,
            other=0.0,
        )
        if DOT_FP32:
            q = q.to(tl.float32)

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


@triton.jit
def _merge_states(
    OUTS,
    LSES,
    OUT,
    LSE_OUT,
    S,
    RH,
    stride_os,
    stride_ls,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The exact merge of ``S`` partial attentions for ``BLOCK`` (row, head) pairs: running maximum of the
    natural-log LSEs, partials weighted by ``exp(lse - max)``; an empty partial (LSE at ``EMPTY_LSE`` or
    -inf) has weight 0 and its output, which may be unwritten, is not read."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < RH
    offs_d = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    o_off = offs[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
    m = tl.zeros([BLOCK], dtype=tl.float32) + _NEG
    w = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    for s in range(S):
        lse = tl.load(LSES + s * stride_ls + offs, mask=valid, other=float("-inf"))
        filled = lse > _EMPTY_HALF
        o = tl.load(OUTS + s * stride_os + o_off, mask=mask & filled[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        scale = tl.exp(m - m_new)
        weight = tl.where(filled, tl.exp(lse - m_new), 0.0)
        acc = acc * scale[:, None] + weight[:, None] * o
        w = w * scale + weight
        m = m_new
    w_safe = tl.where(w > 0, w, 1.0)
    tl.store(OUT + o_off, (acc / w_safe[:, None]).to(OUT.dtype.element_ty), mask=mask)
    tl.store(LSE_OUT + offs, m + tl.log(w_safe), mask=valid)


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


@dataclass(frozen=True)
class PagedConfig:
    block_m: int  # query lanes: (query row, grouped head) pairs a tile
    block_n: int  # keys a tile
    block_d: int
    num_warps: int
    num_stages: int


def launch_config(head_dim: int, max_rows: int, group: int, interpreted: bool | None = None) -> PagedConfig:
    """The tile of a key list whose query rows number at most ``max_rows`` (1 for plain decode, a sibling
    group's size for a cascade prefix): lanes for all of them times the group's heads (16 to 64; a 64-lane
    tile takes Hopper's wgmma with one warp group of 4 warps), 64 keys a tile (32 for a 64-lane tile above
    head dim 64, which spills on 64 keys), 2 stages so the next tile's indirect loads overlap this tile's dots."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = max(16, min(64, triton.next_power_of_2(max(1, max_rows * group))))
    if interpreting() if interpreted is None else interpreted:
        return PagedConfig(block_m, 16, block_d, 4, 1)
    wide = head_dim > 128 or (head_dim > 64 and block_m == 64)
    return PagedConfig(block_m, 32 if wide else 64, block_d, 4, 2)


@dataclass(frozen=True)
class MergeConfig:
    block: int  # (row, head) pairs a program
    block_d: int
    num_warps: int


def merge_config(head_dim: int) -> MergeConfig:
    return MergeConfig(32, max(16, triton.next_power_of_2(head_dim)), 4)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return _cuda_multiprocessors(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_multiprocessors(index: int) -> int:  # asked every decode layer: read once per device
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(max_keys: int, programs: int, splits: int | None, device: torch.device) -> int:
    if splits is not None:
        return max(1, int(splits))
    if interpreting():
        return 1
    # enough programs for about two waves of the device's multiprocessors, at least 256 keys a split; splits
    # past a list's own length exit at once (the kernel checks each list's real range)
    want = max(1, (2 * _multiprocessors(device)) // max(1, programs))
    return max(1, min(want, triton.cdiv(max_keys, 256)))


def _empty_partials(splits: int, r: int, hq: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial outputs and their LSEs, unwritten: every (split, row, head) of a key list's rows gets its LSE from
    the kernel (``EMPTY_LSE`` where the split saw no key, and then its output is never read)."""
    out = torch.empty(splits, r, hq, d, dtype=torch.float32, device=device)
    return out, torch.empty(splits, r, hq, dtype=torch.float32, device=device)


def _split_plan(q, k_cache, slots, max_rows, splits, max_keys) -> tuple[PagedConfig, int, int, int]:
    """(config, query tiles, splits, keys a split) of one ``_partial_attention`` call."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[1]
    group = hq // hkv
    cfg = launch_config(d, max_rows, group)
    num_q_tiles = max(1, triton.cdiv(max_rows * group, cfg.block_m))
    splits = _num_splits(max_keys, slots.shape[0] * hkv * num_q_tiles, splits, q.device)
    chunk = triton.cdiv(triton.cdiv(max(1, max_keys), splits), cfg.block_n) * cfg.block_n
    return cfg, num_q_tiles, splits, chunk


def _partial_attention(q, k_cache, v_cache, slots, kstart, kend, qstart, qidx, plan, scale, out, lse):
    """Run ``_paged_attn_fwd`` with ``plan`` (``_split_plan``), writing the partial outputs fp32 [S, R, Hq, D]
    and natural-log LSEs [S, R, Hq] into ``out``/``lse`` (prepared empty)."""
    cfg, num_q_tiles, splits, chunk = plan
    n_lists = slots.shape[0]
    if n_lists == 0:
        return
    hkv = k_cache.shape[1]
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
        q.shape[1] // hkv,
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
        HEAD_DIM=q.shape[2],
        BLOCK_D=cfg.block_d,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        DOT_FP32=dot_fp32,
        PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def merge_partials(outs: torch.Tensor, lses: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_attention_states`` in one kernel: ``outs`` [S, R, H, D] fp32 (each split contiguous), ``lses``
    [S, R, H] -> (out [R, H, D] in ``dtype``, natural-log LSE [R, H] fp32), each written once."""
    s, r, h, d = outs.shape
    out = torch.empty(r, h, d, dtype=dtype, device=outs.device)
    lse = torch.empty(r, h, dtype=torch.float32, device=outs.device)
    if r * h == 0:
        return out, lse
    cfg = merge_config(d)
    _merge_states[(triton.cdiv(r * h, cfg.block),)](
        outs, lses, out, lse, s, r * h, outs.stride(0), lses.stride(0),
        HEAD_DIM=d, BLOCK_D=cfg.block_d, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )  # fmt: skip
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
    rows: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
):
    """q [B, Hq, D]; k_cache/v_cache [slots, Hkv, D]; kv_slots int64 [B, K] (row b's keys are
    ``kv_slots[b, :kv_len[b]]``) -> out [B, Hq, D] in q's dtype (and the natural-log LSE [B, Hq], fp32).

    ``splits`` forces the number of split-K chunks (default: a heuristic, 1 under the interpreter). ``rows``
    (``arange(B + 1)``) and ``zeros`` (at least B int64 zeros): the caller's, kept for every layer, when given."""
    _check(q, k_cache, v_cache, kv_slots)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    q = q if q.stride(2) == 1 else q.contiguous()
    kv_slots = kv_slots.to(torch.int64).contiguous()
    kv_len = kv_len.to(device=q.device, dtype=torch.int64).contiguous()
    o, lse = _cascade(q, k_cache, v_cache, kv_slots, kv_len, None, scale, splits, None, rows, zeros)
    return (o, lse) if return_lse else o


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
    dev = q.device
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    q = q if q.stride(2) == 1 else q.contiguous()
    kv_slots = kv_slots.to(torch.int64).contiguous()
    kv_len = kv_len.to(device=dev, dtype=torch.int64).contiguous()
    prefix_slots = prefix_slots.to(device=dev, dtype=torch.int64).contiguous()
    prefix_len = prefix_len.to(device=dev, dtype=torch.int64).contiguous()
    group_of_seq = group_of_seq.to(device=dev, dtype=torch.int64)
    n_groups = prefix_slots.shape[0]
    in_group = group_of_seq >= 0
    if n_groups == 0 or not bool(in_group.any()):
        o, lse = _cascade(q, k_cache, v_cache, kv_slots, kv_len, None, scale, splits)
        return (o, lse) if return_lse else o
    # suffix: [prefix_len[g], kv_len) of every sequence (the whole path for ungrouped ones)
    kstart = torch.where(in_group, prefix_len[group_of_seq.clamp(min=0)], torch.zeros_like(kv_len)).contiguous()
    # prefix: one key list per group, its query rows the group's sequences
    grouped = torch.nonzero(in_group).flatten()
    order = grouped[torch.argsort(group_of_seq[grouped], stable=True)]
    counts = torch.bincount(group_of_seq[grouped], minlength=n_groups)
    member_start = torch.cat((counts.new_zeros(1), torch.cumsum(counts, 0))).contiguous()
    prefix = (prefix_slots, prefix_len, order.contiguous(), member_start, int(counts.max()))
    o, lse = _cascade(q, k_cache, v_cache, kv_slots, kv_len, prefix, scale, splits, kstart)
    return (o, lse) if return_lse else o


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
    rows: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """The cascade with its groups precomputed: ``kv_slots[b, :kv_len[b]]`` are sequence b's keys after its
    group's prefix (its whole path when it is in no group); group g's prefix is ``prefix_slots[g,
    :prefix_len[g]]`` and its query rows ``members[member_start[g]:member_start[g + 1]]``, at most
    ``max_members`` of them (a host int: no device sync). ``rows`` (``arange(B + 1)``) and ``zeros`` (int64, at
    least max(B, G) of them), when given, are the caller's, kept for every layer. -> out [B, Hq, D] in q's dtype."""
    _check(q, k_cache, v_cache, kv_slots)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    q = q if q.stride(2) == 1 else q.contiguous()
    prefix = (prefix_slots, prefix_len, members, member_start, max_members)
    return _cascade(q, k_cache, v_cache, kv_slots, kv_len.contiguous(), prefix, scale, splits, None, rows, zeros)[0]


def _cascade(q, k_cache, v_cache, kv_slots, kv_len, prefix, scale, splits, kstart=None, rows=None, zeros=None):
    """Suffix partials (``kv_slots[b, kstart[b]:kv_len[b]]``, one key list a row), the prefix partials of
    ``prefix`` = (slots, lengths, members, member_start, max_members) when given (one key list a group, its
    members' query rows), written side by side into one buffer and merged by one kernel -> (out in q's dtype,
    natural-log LSE). ``rows`` (``arange(B + 1)``) and ``zeros`` (int64 zeros, at least one a row and a group): the
    caller's, kept for every layer, when given."""
    b, hq, d = q.shape
    groups = 0 if prefix is None else prefix[0].shape[0]
    ar = torch.arange(b + 1, device=q.device, dtype=torch.int64) if rows is None else rows
    zeros = torch.zeros(max(b, groups), device=q.device, dtype=torch.int64) if zeros is None else zeros
    kstart = zeros[:b] if kstart is None else kstart
    suffix_plan = _split_plan(q, k_cache, kv_slots, 1, splits, kv_slots.shape[1])
    prefix_plan = None if prefix is None else _split_plan(q, k_cache, prefix[0], prefix[4], splits, prefix[0].shape[1])
    s1 = suffix_plan[2]
    outs, lses = _empty_partials(s1 + (prefix_plan[2] if prefix_plan else 0), b, hq, d, q.device)
    _partial_attention(
        q, k_cache, v_cache, kv_slots, kstart, kv_len, ar, ar[:-1], suffix_plan, scale, outs[:s1], lses[:s1]
    )
    if prefix is not None:
        slots, lengths, members, member_start, _ = prefix
        if members.shape[0] < b:  # rows in no group: their prefix partials are never written
            lses[s1:].fill_(EMPTY_LSE)
        _partial_attention(
            q, k_cache, v_cache, slots, zeros[:groups], lengths, member_start, members, prefix_plan,
            scale, outs[s1:], lses[s1:],
        )  # fmt: skip
    return merge_partials(outs, lses, q.dtype)
