"""KVPool: page accounting, reference counts, sizing, K/V storage."""

import numpy as np
import pytest
import torch

from helpers import alloc_or_evict
from treerpo.engine.kv_pool import KVPool, PoolExhausted, RequestTooLarge


def small_pool(num_pages=8, page_size=1, **kw):
    kw.setdefault("dtype", torch.float32)
    return KVPool(
        num_layers=2, num_kv_heads=2, head_dim=4, device="cpu", page_size=page_size, num_pages=num_pages, **kw
    )


def test_alloc_free_accounting():
    pool = small_pool(8)
    assert (pool.capacity_tokens, pool.free_pages, pool.used_pages, pool.peak_used_pages) == (8, 8, 0, 0)
    a = pool.alloc(3)
    assert a.dtype == torch.long and a.tolist() == [0, 1, 2]
    b = pool.alloc(2)
    assert b.tolist() == [3, 4]
    assert (pool.free_pages, pool.used_pages, pool.peak_used_pages) == (3, 5, 5)
    pool.decref(a)
    assert (pool.free_pages, pool.used_pages, pool.peak_used_pages) == (6, 2, 5)
    assert pool.refcounts().tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    c = pool.alloc(4)  # freed pages are reused
    assert set(c.tolist()) & {0, 1, 2} and not set(c.tolist()) & {3, 4}
    assert pool.peak_used_pages == 6
    pool.decref(b)
    pool.decref(c)
    assert pool.free_pages == 8 and pool.refcounts().sum() == 0
    assert pool.alloc(0).numel() == 0


def test_refcount_sharing_frees_once():
    pool = small_pool(4)
    s = pool.alloc(2)
    pool.incref(s)
    assert pool.refcounts(s).tolist() == [2, 2]
    pool.decref(s)
    assert pool.free_pages == 2  # still held by the second reference
    pool.decref(s)
    assert pool.free_pages == 4
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref(s)
    with pytest.raises(RuntimeError, match="free KV page"):
        pool.incref(s)
    assert pool.free_pages == 4  # the failed calls changed nothing
    # an atomic failure: one live slot and one free slot -> nothing decremented
    t = pool.alloc(1)
    with pytest.raises(RuntimeError):
        pool.decref(torch.tensor([t.item(), 3]))
    assert pool.refcounts(t).tolist() == [1]
    with pytest.raises(IndexError):
        pool.decref(torch.tensor([4]))


def test_too_large_vs_exhausted():
    pool = small_pool(8)
    with pytest.raises(RequestTooLarge, match=r"9 tokens.*holds 8 tokens.*bigger memory budget") as err:
        pool.alloc(9)
    assert isinstance(err.value, ValueError)
    assert pool.free_pages == 8
    held = pool.alloc(6)
    assert (pool.pages_for(2) <= pool.free_pages) and not (pool.pages_for(3) <= pool.free_pages)
    with pytest.raises(PoolExhausted) as err2:
        pool.alloc(3)
    assert isinstance(err2.value, RuntimeError) and not isinstance(err2.value, ValueError)
    assert pool.free_pages == 2
    pool.decref(held)
    assert pool.alloc(8).numel() == 8


@pytest.mark.parametrize("dtype,size", [(torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4)])
def test_sizing_from_memory_bytes(dtype, size):
    layers, heads, dim, page = 3, 2, 8, 4
    bpt = 2 * layers * heads * dim * size  # K and V
    pool = KVPool(layers, heads, dim, dtype, "cpu", page_size=page, memory_bytes=bpt * page * 10 + bpt * page - 1)
    assert pool.bytes_per_token == bpt
    assert pool.num_pages == 10 and pool.capacity_tokens == 40  # the partial 11th page is not counted
    assert tuple(pool.k[0].shape) == (40, heads, dim) and pool.k.shape[0] == layers
    assert pool.k.dtype == dtype
    assert pool.peak_used_bytes == 0
    pool.alloc(5)
    assert pool.peak_used_bytes == 2 * page * bpt


def test_sizing_arguments_are_exclusive_and_checked():
    with pytest.raises(ValueError, match="exactly one"):
        KVPool(1, 1, 4, torch.float32, "cpu", num_pages=4, memory_bytes=1024)
    with pytest.raises(ValueError, match="exactly one"):
        KVPool(1, 1, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="smaller than one page"):
        KVPool(1, 1, 4, torch.float32, "cpu", memory_bytes=31)  # one token = 2*4*4 = 32 bytes
    with pytest.raises(ValueError):
        KVPool(1, 1, 4, torch.float32, "cpu", memory_fraction=1.5)


def test_sizing_from_memory_fraction_on_cpu():
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    frac = 2e-6
    pool = KVPool(1, 1, 2, torch.float32, "cpu", memory_fraction=frac)  # 16 bytes per token
    expected = avail * frac / 16
    assert pool.num_pages >= 1
    assert abs(pool.num_pages - expected) <= 0.2 * expected + 2


def test_write_gather_roundtrip():
    pool = small_pool(8)
    slots = torch.tensor([5, 2, 7])
    k = torch.randn(3, 2, 4)
    v = torch.randn(3, 2, 4)
    pool.write(1, slots, k, v)
    gk, gv = pool.gather(1, slots)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    gk2, _ = pool.gather(1, torch.tensor([7, 5]))
    assert torch.equal(gk2, k[[2, 0]])
    assert torch.equal(pool.k[1][5], k[0])
    assert pool.k[0].abs().sum() == 0 and pool.v[0].abs().sum() == 0  # other layer untouched
    assert pool.k[1][[0, 1, 3, 4, 6]].abs().sum() == 0  # other slots untouched
    with pytest.raises(ValueError, match="shape"):
        pool.write(0, slots, k[:2], v[:2])
    # dtype conversion on write
    half = small_pool(4, dtype=torch.float16)
    half.write(0, torch.tensor([1]), k[:1], v[:1])
    assert half.k[0][1].dtype == torch.float16 and torch.allclose(half.k[0][1].float(), k[0], atol=1e-2)


def test_page_size_4_slot_layout():
    pool = small_pool(num_pages=4, page_size=4)
    assert pool.capacity_tokens == 16
    a = pool.alloc(6)  # pages 0 and 1
    assert a.tolist() == [0, 1, 2, 3, 4, 5]
    assert pool.used_pages == 2 and pool.refcounts().tolist() == [1, 1, 0, 0]
    b = pool.alloc(3)  # page 2
    assert b.tolist() == [8, 9, 10]
    assert (b // pool.page_size).tolist() == [2, 2, 2]
    pool.incref(a[:3])  # three slots of page 0: one more reference on page 0 only
    assert pool.refcounts().tolist() == [2, 1, 1, 0]
    pool.decref(a[4:5])  # one slot of page 1 releases the page
    assert pool.refcounts().tolist() == [2, 0, 1, 0] and pool.free_pages == 2
    c = pool.alloc(4)  # last freed page first
    assert c.tolist() == [4, 5, 6, 7]
    with pytest.raises(RequestTooLarge):
        pool.alloc(17)
    with pytest.raises(PoolExhausted):
        pool.alloc(5)  # 2 pages, 1 free
    assert (pool.pages_for(4) <= pool.free_pages) and not (pool.pages_for(5) <= pool.free_pages)


def test_alloc_or_evict_calls_the_evict_function():
    pool = small_pool(4)
    held = [pool.alloc(1) for _ in range(4)]
    calls = []

    def evict(pages_needed):
        calls.append(pages_needed)
        pool.decref(held.pop(0))  # frees one page per call
        return 1

    slots = alloc_or_evict(pool, 3, evict)
    assert calls == [3, 2, 1] and slots.numel() == 3 and pool.free_pages == 0

    pool2 = small_pool(4)
    pool2.alloc(4)
    nothing = []
    with pytest.raises(PoolExhausted):
        alloc_or_evict(pool2, 1, lambda n: nothing.append(n) or 0)
    assert nothing == [1]
    # an evict_fn that claims progress but frees no page must not loop forever
    with pytest.raises(PoolExhausted):
        alloc_or_evict(pool2, 1, lambda n: 5)
    # never fits: RequestTooLarge without evicting anything
    called = []
    with pytest.raises(RequestTooLarge):
        alloc_or_evict(pool2, 5, lambda n: called.append(n) or 0)
    assert called == []
    # fits right away: evict_fn not called
    pool3 = small_pool(4)
    assert alloc_or_evict(pool3, 2, lambda n: pytest.fail("evicted needlessly")).tolist() == [0, 1]


def test_numpy_and_list_slots_accepted():
    pool = small_pool(4)
    s = pool.alloc(2)
    pool.incref(s.numpy())
    pool.decref(s.tolist())
    assert np.array_equal(pool.refcounts(s), [1, 1])
