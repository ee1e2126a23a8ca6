"""Paged K/V storage with per-page reference counts.

The pool owns one K and one V buffer per layer, each ``[num_pages * page_size, kv_heads,
head_dim]``. A *slot* is one token's row in those buffers; slot ``s`` lives in page
``s // page_size`` at offset ``s % page_size``. Pages are the unit of allocation and of
reference counting: ``alloc(n)`` takes ``ceil(n / page_size)`` free pages, each with one
reference, and hands back the first ``n`` slots of those pages in order.

Reference counting is per page. ``incref(slots)`` / ``decref(slots)`` add / remove one
reference on every *distinct* page that ``slots`` touch (a slot listed twice, or two
slots of the same page, count once). A page goes back to the free list when its count
reaches zero; decref of a free page raises (a double free is a bug in the caller).

Every holder of a reference releases exactly what it took: a request releases the slots
it allocated or incref'd when it finishes; the radix cache releases its own reference when
it evicts a node. Page size 1 is the default because a branch point then never falls
inside a page, so siblings share every token of their common prefix.

Sizing: exactly one of ``num_pages``, ``memory_bytes`` or ``memory_fraction`` (a fraction of
the device's free memory now: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of
``/proc/meminfo`` on CPU). ``bytes_per_token = 2 * num_layers * num_kv_heads * head_dim *
dtype size`` (K and V).

The bookkeeping (free list, reference counts) lives on the host; slot index tensors handed
out are CPU ``int64`` tensors, moved to the storage device only to index the buffers.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["KVPool", "PoolExhausted", "RequestTooLarge"]


class PoolExhausted(RuntimeError):
    """Not enough free pages right now; wait for requests to finish or evict cached KV."""


class RequestTooLarge(ValueError):
    """The request needs more tokens than the whole pool holds: it can never fit."""


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:  # pragma: no cover - non-Linux hosts
        raise RuntimeError(
            "memory_fraction on CPU reads /proc/meminfo, which is unreadable here; "
            "give memory_bytes or num_pages instead"
        ) from exc
    raise RuntimeError(
        "no MemAvailable line in /proc/meminfo; give memory_bytes or num_pages instead"
    )  # pragma: no cover


def _as_index_array(slots) -> np.ndarray:
    if isinstance(slots, torch.Tensor):
        return slots.detach().to("cpu", torch.int64).reshape(-1).numpy()
    return np.asarray(slots, dtype=np.int64).reshape(-1)


class KVPool:
    """Per-layer K/V buffers in token slots grouped into ref-counted pages."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        page_size: int = 1,
        num_pages: int | None = None,
        memory_bytes: int | None = None,
        memory_fraction: float | None = None,
    ):
        for name, val in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("page_size", page_size),
        ):
            if int(val) != val or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = int(num_layers), int(num_kv_heads), int(head_dim)
        self.page_size = int(page_size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.dtype_size = torch.empty((), dtype=dtype).element_size()

        given = [
            n
            for n, v in (("num_pages", num_pages), ("memory_bytes", memory_bytes), ("memory_fraction", memory_fraction))
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(f"give exactly one of num_pages, memory_bytes, memory_fraction (got {given or 'none'})")
        if memory_fraction is not None:
            if not 0.0 < memory_fraction <= 1.0:
                raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
            memory_bytes = int(_available_memory(self.device) * memory_fraction)
        if memory_bytes is not None:
            num_pages = int(memory_bytes) // self.bytes_per_page
            if num_pages < 1:
                raise ValueError(
                    f"a KV budget of {int(memory_bytes)} bytes is smaller than one page "
                    f"({self.bytes_per_page} bytes = {self.page_size} tokens x {self.bytes_per_token} "
                    f"bytes/token); give the pool more memory"
                )
        if int(num_pages) != num_pages or num_pages < 1:
            raise ValueError(f"num_pages must be an integer >= 1, got {num_pages!r}")
        self.num_pages = int(num_pages)

        shape = (self.num_layers, self.capacity_tokens, self.num_kv_heads, self.head_dim)
        self._kv = torch.zeros((2,) + shape, dtype=dtype, device=self.device)
        self.k = self._kv[0]  # k[layer] -> [capacity_tokens, kv_heads, head_dim]
        self.v = self._kv[1]
        self.scratch_slot: int | None = None  # reserve_scratch_slot

        self._refcount = np.zeros(self.num_pages, dtype=np.int32)
        # A stack: pop from the end. Reversed so that a fresh pool hands out pages 0, 1, 2, ...
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))
        self.peak_used_pages = 0

    # ------------------------------------------------------------------ sizes
    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_size

    @property
    def bytes_per_page(self) -> int:
        return self.bytes_per_token * self.page_size

    def reserve_scratch_slot(self) -> int:
        """A slot no sequence ever gets, for the padding rows of a decode step (shape buckets) to write and read: the
        pool's last page, taken out of its pages (one page fewer to hand out). Once; before any allocation."""
        if self.scratch_slot is None:
            last = self.num_pages - 1
            if last < 1 or len(self._free) != self.num_pages:
                raise ValueError("a scratch slot needs a fresh pool of at least 2 pages")
            self._free.remove(last)
            self.num_pages = last
            self.scratch_slot = last * self.page_size
        return self.scratch_slot

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.page_size

    @property
    def peak_used_bytes(self) -> int:
        """KV bytes held at the peak (for benchmarks)."""
        return self.peak_used_pages * self.bytes_per_page

    def pages_for(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.page_size)

    def refcounts(self, slots=None) -> np.ndarray:
        """A copy of the reference count of every page (or of the page of each slot given)."""
        if slots is None:
            return self._refcount.copy()
        return self._refcount[self._pages(slots, unique=False)].copy()

    # ------------------------------------------------------------- allocation
    def _check_fits_ever(self, num_tokens: int) -> int:
        if int(num_tokens) != num_tokens or num_tokens < 0:
            raise ValueError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
        pages = self.pages_for(num_tokens)
        if pages > self.num_pages:
            raise RequestTooLarge(
                f"a request of {int(num_tokens)} tokens ({pages} pages of {self.page_size}) can never fit: the KV pool "
                f"holds {self.capacity_tokens} tokens ({self.num_pages} pages, "
                f"{self.num_pages * self.bytes_per_page / 2**20:.1f} MiB at {self.bytes_per_token} bytes/token). "
                f"Give the pool a bigger memory budget (num_pages / memory_bytes / memory_fraction) or sample a "
                f"smaller tree (fewer or shorter branches, a shorter prompt)"
            )
        return pages

    def alloc(self, num_tokens: int) -> torch.Tensor:
        """``num_tokens`` slots (CPU int64) from ``ceil(n / page_size)`` fresh pages, refcount 1 each."""
        pages_needed = self._check_fits_ever(num_tokens)
        if pages_needed > len(self._free):
            raise PoolExhausted(
                f"KV pool exhausted: {int(num_tokens)} tokens need {pages_needed} pages, "
                f"{len(self._free)} of {self.num_pages} are free"
            )
        if pages_needed == 0:
            return torch.zeros(0, dtype=torch.long)
        pages = self._free[-pages_needed:][::-1]
        del self._free[-pages_needed:]
        pages_np = np.asarray(pages, dtype=np.int64)
        self._refcount[pages_np] = 1
        self.peak_used_pages = max(self.peak_used_pages, self.used_pages)
        if self.page_size == 1:
            return torch.from_numpy(pages_np)
        slots = (pages_np[:, None] * self.page_size + np.arange(self.page_size)[None, :]).reshape(-1)
        return torch.from_numpy(np.ascontiguousarray(slots[:num_tokens]))

    def _pages(self, slots, unique: bool = True) -> np.ndarray:
        idx = _as_index_array(slots)
        if idx.size and (idx.min() < 0 or idx.max() >= self.capacity_tokens):
            raise IndexError(
                f"slot index out of range [0, {self.capacity_tokens}): min {int(idx.min())}, max {int(idx.max())}"
            )
        pages = idx // self.page_size if self.page_size > 1 else idx
        return np.unique(pages) if unique else pages

    def incref(self, slots) -> None:
        """One more reference on every distinct page touched by ``slots`` (each must be allocated)."""
        pages = self._pages(slots)
        if pages.size == 0:
            return
        if (self._refcount[pages] <= 0).any():
            bad = pages[self._refcount[pages] <= 0][:8].tolist()
            raise RuntimeError(f"incref of free KV page(s) {bad}: the caller holds slots it no longer owns")
        self._refcount[pages] += 1

    def decref(self, slots) -> None:
        """Release one reference on every distinct page touched by ``slots``; pages at zero become free."""
        pages = self._pages(slots)
        if pages.size == 0:
            return
        counts = self._refcount[pages]
        if (counts <= 0).any():
            bad = pages[counts <= 0][:8].tolist()
            raise RuntimeError(f"decref of free KV page(s) {bad} (double free): a bug in the caller's ownership")
        counts -= 1
        self._refcount[pages] = counts
        freed = pages[counts == 0]
        if freed.size:
            self._free.extend(freed.tolist())

    # ------------------------------------------------------------- K/V access
    def _device_index(self, slots) -> torch.Tensor:
        if not isinstance(slots, torch.Tensor):
            slots = torch.as_tensor(slots, dtype=torch.long)
        return slots.to(self.device, torch.long, non_blocking=True)

    def write(self, layer: int, slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ([n, kv_heads, head_dim]) of layer ``layer`` at ``slots`` ([n])."""
        idx = self._device_index(slots)
        expected = (idx.numel(), self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"write expects k and v of shape {expected}, got {tuple(k.shape)} and {tuple(v.shape)}")
        self.k[layer].index_copy_(0, idx, k.to(self.dtype))
        self.v[layer].index_copy_(0, idx, v.to(self.dtype))

    def gather(self, layer: int, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of layer ``layer`` at ``slots``: two [n, kv_heads, head_dim] tensors."""
        idx = self._device_index(slots)
        return self.k[layer].index_select(0, idx), self.v[layer].index_select(0, idx)

    def __repr__(self) -> str:
        return (
            f"KVPool(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"dtype={self.dtype}, device={self.device}, page_size={self.page_size}, pages={self.num_pages}, "
            f"free={self.free_pages}, {self.num_pages * self.bytes_per_page / 2**20:.1f} MiB)"
        )
