"""Unproven kernels are checked before they are trusted.

The first time a Triton backend (tree attention, paged/cascade decode) would run on a device
and dtype in this process, it is compared with the PyTorch reference on a small random case
(values; gradients too for tree attention). On a mismatch or an exception one warning names the
kernel and the device, and the reference backend is used from then on. ``TREERPO_VERIFY_KERNELS=0``
(or ``set_kernel_verification(False)``, the trainer's ``--verify-kernels false``) skips the check
on a device already proven.
"""

from __future__ import annotations

import logging
import os

import torch

from treerpo.attention.registry import reference_backend

logger = logging.getLogger(__name__)
# norm-relative error allowed (||kernel - reference|| / ||reference||, each of the output and the gradients):
# scale-free, so a dK summed over many grouped heads, or a larger head dim, is judged like any other
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
_verdicts: dict[tuple[str, str, str, str], bool] = {}
_enabled = os.environ.get("TREERPO_VERIFY_KERNELS", "1") != "0"


def set_kernel_verification(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def checked_backend(
    kind: str, name: str, device: torch.device, dtype: torch.dtype, heads: tuple[int, int, int] = (4, 2, 32)
) -> str:
    """``name``, or the reference backend when ``name`` is a Triton kernel that failed its check here.
    ``heads``: (query heads, KV heads, head dim) of the call, checked with the same shapes."""
    if name != "triton" or not _enabled:
        return name
    key = (kind, name, str(device), str(dtype), heads)
    if key not in _verdicts:
        _verdicts[key] = _verify(kind, device, dtype, heads)
    return name if _verdicts[key] else reference_backend(kind)


def _verify(kind: str, device: torch.device, dtype: torch.dtype, heads: tuple[int, int, int]) -> bool:
    try:
        # identity hooks: inside a layer under activation checkpointing, its saved-tensor hooks must not see
        # the check's own graph
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            error = (_tree_error if kind == "tree" else _paged_error)(device, dtype, *heads)
    except Exception as exc:  # a kernel that does not compile or launch here
        error, detail = float("inf"), f"{type(exc).__name__}: {exc}"
    else:
        detail = f"relative error {error:.3g} against the PyTorch reference"
    if error <= TOLERANCE.get(dtype, 6e-2):
        return True
    logger.warning(
        "the Triton %s attention kernel failed its first-use check on %s (%s, %s); using the %r "
        "backend for this device and dtype",
        kind,
        device,
        dtype,
        detail,
        reference_backend(kind),
    )
    return False


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (fp32), inf for non-finite values."""
    actual, expected = actual.float(), expected.float()
    if not torch.isfinite(actual).all():
        return float("inf")
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-30))


def _chain(parent: list[int], start: int, length: int) -> int:
    """Append ``length`` tokens after token ``start``; returns the last one."""
    for _ in range(length):
        parent.append(start)
        start = len(parent) - 1
    return start


def _small_tree() -> tuple[torch.Tensor, torch.Tensor]:
    """Euler intervals of a 40-token prompt with three 30-token branches, one forking again after 15 tokens
    (145 tokens: several tiles, skipped tiles, a fork inside a tile)."""
    parent: list[int] = [-1]
    prompt_end = _chain(parent, 0, 39)
    for b in range(3):
        mid = _chain(parent, prompt_end, 15)
        _chain(parent, mid, 15)
        if b == 1:
            _chain(parent, mid, 15)
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parent):
        children.setdefault(p, []).append(i)
    tin, tout, clock, stack = [0] * len(parent), [0] * len(parent), 0, [(0, False)]
    while stack:
        node, done = stack.pop()
        if done:
            tout[node] = clock
            continue
        tin[node], clock = clock, clock + 1
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(children.get(node, [])))
    order = sorted(range(len(parent)), key=tin.__getitem__)  # packed depth-first
    return (
        torch.tensor([tin[i] for i in order], dtype=torch.int32),
        torch.tensor([tout[i] for i in order], dtype=torch.int32),
    )


@torch.enable_grad()
def _tree_error(device, dtype, hq: int, hkv: int, d: int) -> float:
    from treerpo.attention.registry import get_tree_backend

    gen = torch.Generator().manual_seed(0)
    tin, tout = (t.to(device) for t in _small_tree())
    q, k, v = (
        torch.randn(1, heads, len(tin), d, generator=gen).to(device, dtype).requires_grad_() for heads in (hq, hkv, hkv)
    )
    grad_out = torch.randn(1, hq, len(tin), d, generator=gen).to(device, dtype)
    results = []
    for backend in ("triton", reference_backend("tree")):
        out = get_tree_backend(backend)(q, k, v, tin, tout, scale=None, cache={})
        results.append([out.detach().float(), *(g.float() for g in torch.autograd.grad(out, (q, k, v), grad_out))])
    return max(relative_error(a, b) for a, b in zip(*results, strict=True))


def _paged_error(device, dtype, hq: int, hkv: int, d: int) -> float:
    from treerpo.attention.paged import PagedAttentionMetadata
    from treerpo.attention.registry import get_paged_backend

    gen = torch.Generator().manual_seed(0)
    pool = _PagedCache(150, hkv, d, dtype, device)
    slots = torch.randperm(150, generator=gen)  # token slots in no particular order, as a paged pool hands them out
    pool.write(0, slots, *(torch.randn(150, hkv, d, generator=gen).to(device, dtype) for _ in range(2)))
    sequences = [(slots[:9].numpy(), slots[9:10].numpy()), (slots[10:149].numpy(), slots[149:150].numpy())]
    meta = PagedAttentionMetadata.build(pool, sequences, device)
    query = torch.randn(1, hq, 2, d, generator=gen).to(device, dtype)
    key, value = (torch.randn(1, hkv, 2, d, generator=gen).to(device, dtype) for _ in range(2))
    module = _LayerZero()
    outs = [
        get_paged_backend(name)(module, query, key, value, meta, None).float()
        for name in ("triton", reference_backend("paged"))
    ]
    return relative_error(outs[0], outs[1])


class _PagedCache:
    """One layer of paged K/V storage with the interface the paged backends read (``k``, ``v``, ``write``)."""

    def __init__(self, slots: int, kv_heads: int, head_dim: int, dtype, device):
        self.num_kv_heads, self.head_dim = kv_heads, head_dim
        self.k, self.v = ([torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=device)] for _ in range(2))

    def write(self, layer: int, slots, k: torch.Tensor, v: torch.Tensor) -> None:
        idx = torch.as_tensor(slots, device=self.k[layer].device)
        self.k[layer].index_copy_(0, idx, k)
        self.v[layer].index_copy_(0, idx, v)


class _LayerZero:
    layer_idx = 0
