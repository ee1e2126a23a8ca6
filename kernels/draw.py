"""A decode step's draws in one kernel: inverse-CDF sampling (or the argmax) from fp32 logits, in fp64.

One program a row reads the row's logits three times and writes nothing but its results:
  1. the maximum (and the first index holding it, for greedy rows), and whether a logit is NaN or +inf;
  2. the fp64 sum of ``exp((x - max) / T)`` (and of its products with the exponent, for the entropy);
  3. for each of the row's K uniforms, the number of cumulative sums at or below ``u * total``: that count is the
     inverse-CDF token (``searchsorted(cdf, u * total, right=True)``, clamped to the last token with weight).
So a logit costs 12 bytes read after the 4 the LM head wrote, against about 90 for the PyTorch draw
(``engine/sampling.draw``: an fp64 copy, scaling, shift, exponent and cumulative sum in place, each a pass that
reads and writes 8 bytes), and the step launches one kernel instead of about twenty. The arithmetic is the
PyTorch draw's in fp64, but for the order of additions and ``(x - max) / T`` against ``x / T - max / T`` (a few
units in the 16th digit): a seeded draw picks PyTorch's token unless its uniform lies within about 1e-15 of a
CDF boundary (the tests place uniforms 1e-10 from boundaries). A row with a NaN or +inf logit, or with no finite
one, is flagged. Truncated sampling (top-k, top-p) and more than ``MAX_DRAWS`` draws a row stay with PyTorch.

Each row's results land in one fp64 row ``[K tokens, K log-probs, bad, entropy]`` of the caller's buffer, so a
whole step's results reach the host in one copy.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["fused_draw", "BLOCK", "MAX_DRAWS", "result_columns"]

BLOCK = 512  # logits a loop step reads; 3 x V / BLOCK steps a row
NUM_WARPS = 16  # with BLOCK, no spill on sm_80/sm_90 up to MAX_DRAWS draws a row (kernels/aot.py)
TRAFFIC_BYTES_PER_LOGIT = 12  # three passes, each reading the fp32 logits once
MAX_DRAWS = 16  # draws a row (a branch's next token and its children's first); wider steps use PyTorch's draw


def result_columns(width: int) -> int:
    """Columns of a result row for ``width`` draws a row: tokens, log-probs, the non-finite flag, the entropy."""
    return 2 * width + 2


@triton.jit
def _draw_fwd(
    LOGITS, U, OUT, TEMPERATURE, n_vocab, n_draws, stride_l, stride_u, stride_o,
    GREEDY: tl.constexpr, ENTROPY: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    offs = tl.arange(0, BLOCK)
    # pass 1: the maximum, the first index holding it, NaN or +inf anywhere
    top = tl.full([], float("-inf"), tl.float32)
    arg = tl.full([], 0, tl.int64)
    bad = tl.full([], 0, tl.int32)
    for start in range(0, n_vocab, BLOCK):
        cols = start + offs
        valid = cols < n_vocab
        x = tl.load(base + cols, mask=valid, other=float("-inf"))
        bad = bad | tl.max(((x != x) | (x == float("inf"))).to(tl.int32), 0)
        block_max = tl.max(x, 0)
        block_arg = tl.argmax(x, 0, tie_break_left=True)
        better = block_max > top
        arg = tl.where(better, start + block_arg, arg)
        top = tl.where(better, block_max, top)
    top64 = top.to(tl.float64)
    t = tl.load(TEMPERATURE)  # fp64: a float argument would arrive as fp32 (0.7 as 0.69999999)
    # pass 2: the softmax's denominator (and the entropy's sum) in fp64
    total = tl.full([], 0.0, tl.float64)
    weighted = tl.full([], 0.0, tl.float64)
    last = tl.full([], 0, tl.int64)  # the last token with weight: the clamp of a search past the total
    for start in range(0, n_vocab, BLOCK):
        cols = start + offs
        valid = cols < n_vocab
        x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float64)
        s = tl.where(valid, x - top64 if GREEDY else (x - top64) / t, float("-inf"))
        w = tl.exp(s)
        total += tl.sum(w, 0)
        last = tl.maximum(last, tl.max(tl.where(w > 0, cols, 0), 0).to(tl.int64))
        if ENTROPY:
            weighted += tl.sum(w * tl.where(w > 0, s, 0.0), 0)  # a masked token (-inf) adds nothing
    log_total = tl.log(total)
    ks = tl.arange(0, KB)
    k_valid = ks < n_draws
    if GREEDY:
        tokens = tl.zeros([KB], dtype=tl.int64) + arg
    else:
        # pass 3: how many cumulative sums lie at or below each target is the token searchsorted would return
        u = tl.load(U + row * stride_u + ks, mask=k_valid, other=0.0).to(tl.float64)
        targets = u * total
        below = tl.zeros([KB], dtype=tl.int64)
        running = tl.full([], 0.0, tl.float64)
        for start in range(0, n_vocab, BLOCK):
            cols = start + offs
            valid = cols < n_vocab
            x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float64)
            w = tl.exp(tl.where(valid, (x - top64) / t, float("-inf")))
            cdf = running + tl.cumsum(w, 0)
            at_or_below = (cdf[None, :] <= targets[:, None]) & valid[None, :]
            below += tl.sum(at_or_below.to(tl.int64), 1)
            running += tl.sum(w, 0)
        tokens = tl.minimum(below, last)
    chosen = tl.load(base + tokens, mask=k_valid, other=0.0).to(tl.float64)
    logprobs = (chosen - top64 if GREEDY else (chosen - top64) / t) - log_total
    out = OUT + row * stride_o
    tl.store(out + ks, tokens.to(tl.float64), mask=k_valid)
    tl.store(out + n_draws + ks, logprobs, mask=k_valid)
    bad = bad | (top == float("-inf")).to(tl.int32)  # no finite logit: nothing to draw from
    tl.store(out + 2 * n_draws, bad.to(tl.float64))
    if ENTROPY:
        tl.store(out + 2 * n_draws + 1, log_total - weighted / total)


@functools.cache
def _temperature(value: float, device: torch.device) -> torch.Tensor:
    """The temperature as an fp64 scalar on the device, made once per value."""
    return torch.tensor([value], dtype=torch.float64, device=device)


def fused_draw(logits: torch.Tensor, u: torch.Tensor, temperature: float, entropy: bool, out: torch.Tensor) -> None:
    """logits fp32 [R, V] (rows contiguous), uniforms fp64 [R, K] (ignored when ``temperature`` is 0: greedy, whose
    log-probs and entropy are those of temperature 1) -> ``out`` fp64 [R, 2K + 2]: per row its K tokens, their
    log-probs under ``logits / temperature``, 1.0 where a logit is NaN or +inf, and its entropy (with ``entropy``)."""
    r, v = logits.shape
    k = u.shape[1]
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"fused_draw reads fp32 logits with contiguous rows, got {logits.dtype} {logits.stride()}")
    if u.dtype != torch.float64 or u.shape[0] != r or out.shape != (r, result_columns(k)) or out.stride(1) != 1:
        raise ValueError(f"fused_draw: uniforms fp64 [{r}, K] and out fp64 [{r}, 2K + 2], got {u.shape}, {out.shape}")
    if k > MAX_DRAWS:
        raise ValueError(f"fused_draw takes at most {MAX_DRAWS} draws a row, got {k}")
    if r == 0:
        return
    greedy = temperature == 0
    _draw_fwd[(r,)](
        logits, u, out, _temperature(1.0 if greedy else float(temperature), logits.device),
        v, k, logits.stride(0), u.stride(0), out.stride(0),
        GREEDY=greedy, ENTROPY=bool(entropy), KB=triton.next_power_of_2(max(k, 1)), BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
