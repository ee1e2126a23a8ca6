"""Tree attention with PyTorch FlexAttention: the interval mask as a ``mask_mod``, a BlockMask per batch.

Token q sees token k iff ``tin[k] <= tin[q] < tout[k]``. The BlockMask (which 128x128 tiles hold at
least one visible pair, and the per-element ``mask_mod`` for the partial ones) is built once per
batch and kept in ``cache`` (the dict shared by every layer of one forward), so every layer and head
reuses it.

* CUDA: the compiled ``flex_attention`` (compiled once, at module level, ``dynamic=False``). The
  length is padded up to a multiple of 128 (padding hidden by the mask), so every batch whose length
  falls in the same 128 bucket reuses one compiled kernel; forward and backward.
* CPU: ``flex_attention`` eager (an unfused reference that materialises the scores), forward only:
  FlexAttention has no CPU backward, so a call that would need one is refused, naming the ``paths``
  backend.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

BLOCK = 128  # FlexAttention's default tile; lengths are padded to a multiple of it
_PAD_TIN = 2**30  # padded tokens: tin = huge, tout = -1 -> nobody sees them and they see nobody
_CACHE_KEY = "flex_block_mask"
_compiled_flex = None


def _flex_for(device: torch.device):
    """The compiled flex_attention on CUDA (compiled once per process), the eager one elsewhere."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def padded_length(n: int, block: int = BLOCK) -> int:
    return -(-n // block) * block


def interval_mask_mod(tin: torch.Tensor, tout: torch.Tensor):
    """``mask_mod(b, h, q_idx, kv_idx)``: True where key ``kv_idx`` is an ancestor-or-self of query ``q_idx``."""

    def mask_mod(b, h, q_idx, kv_idx):
        tin_q = tin[q_idx]
        return (tin[kv_idx] <= tin_q) & (tin_q < tout[kv_idx])

    return mask_mod


def build_block_mask(tin: torch.Tensor, tout: torch.Tensor, device) -> dict:
    """The BlockMask of one packed batch over the padded length, and that length."""
    device = torch.device(device)
    n = int(tin.numel())
    n_pad = padded_length(n)
    tin_p = torch.full((n_pad,), _PAD_TIN, dtype=torch.int32, device=device)
    tout_p = torch.full((n_pad,), -1, dtype=torch.int32, device=device)
    tin_p[:n] = tin.to(device=device, dtype=torch.int32)
    tout_p[:n] = tout.to(device=device, dtype=torch.int32)
    block_mask = create_block_mask(
        interval_mask_mod(tin_p, tout_p),
        None,
        None,
        n_pad,
        n_pad,
        device=device,
        BLOCK_SIZE=BLOCK,
        _compile=device.type == "cuda",
    )
    return {"block_mask": block_mask, "n": n, "n_pad": n_pad, "device": device, "tin": tin_p, "tout": tout_p}


def _check_cpu_grad(query, key, value) -> None:
    if (
        query.device.type == "cpu"
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
    ):
        raise RuntimeError(
            "the 'flex' tree attention backend has no backward on CPU (FlexAttention supports CPU "
            "forward only); use the 'paths' backend for CPU training, or run under torch.no_grad()"
        )


def flex_tree_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tin: torch.Tensor,
    tout: torch.Tensor,
    scale: float | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """query [B, Hq, N, D], key/value [B, Hkv, N, D] -> [B, Hq, N, D]; the layout of ``sdpa_tree_attention``."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if tin.numel() != n or tout.numel() != n:
        raise ValueError(f"tin/tout have {tin.numel()}/{tout.numel()} entries for {n} tokens")
    _check_cpu_grad(query, key, value)
    if n == 0:
        return query.new_empty(query.shape)
    meta = cache.get(_CACHE_KEY) if cache is not None else None
    if meta is None or meta["n"] != n or meta["device"] != query.device:
        meta = build_block_mask(tin, tout, query.device)
        if cache is not None:
            cache[_CACHE_KEY] = meta
    pad = meta["n_pad"] - n
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    fn = _flex_for(query.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = fn(query, key, value, block_mask=meta["block_mask"], scale=scale, enable_gqa=hq != hkv)
    return out[:, :, :n] if pad else out
