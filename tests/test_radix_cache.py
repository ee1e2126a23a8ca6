"""RadixCache: hand cases, then random operation sequences checked against pool reference counts.

Every slot written in these tests carries a tag in the pool: k = an exact code of the token
prefix it holds KV for, v = the policy version it was computed under. A match is right only
if the tags of the slots it returns spell the queried prefix under the current version.
"""

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from helpers import alloc_or_evict
from treerpo.engine.kv_pool import KVPool, PoolExhausted, RequestTooLarge
from treerpo.engine.radix_cache import RadixCache

VOCAB = 3


def prefix_code(tokens) -> float:
    code = 0
    for t in tokens:
        code = code * (VOCAB + 2) + int(t) + 1  # exact in float64 for the short paths used here
    return float(code)


def make(num_pages=32, page_size=1):
    pool = KVPool(1, 1, 1, torch.float64, "cpu", page_size=page_size, num_pages=num_pages)
    return pool, RadixCache(pool)


def write_tags(pool, cache, tokens, slots, start):
    """Write the tags of tokens[start + j] at slots[j] (as a model forward would write K/V)."""
    n = len(slots)
    k = torch.tensor([prefix_code(tokens[: start + j + 1]) for j in range(n)], dtype=torch.float64)
    v = torch.full((n,), float(cache.policy_version), dtype=torch.float64)
    pool.write(0, slots, k.view(n, 1, 1), v.view(n, 1, 1))


def check_match(pool, cache, tokens, slots, node):
    n = len(slots)
    assert n <= len(tokens) and n % cache.page_size == 0
    k, v = pool.gather(0, slots)
    assert k.view(-1).tolist() == [prefix_code(tokens[: j + 1]) for j in range(n)], "slots hold KV of other tokens"
    assert (v.view(-1) == cache.policy_version).all(), "a match returned KV of an older policy version"
    assert (pool.refcounts(slots) > 0).all(), "a match returned slots on free pages"
    assert path_tokens(cache, node) == tuple(tokens[:n])


def path_tokens(cache, node):
    parts = []
    while node is not cache.root:
        parts.append(node.key)
        node = node.parent
    return tuple(t for key in reversed(parts) for t in key)


def path_slots(cache, node):
    parts = []
    while node is not cache.root:
        parts.append(node.value)
        node = node.parent
    return torch.cat(parts[::-1]) if parts else torch.zeros(0, dtype=torch.long)


def insert_fresh(pool, cache, tokens):
    """A finished request's path: allocate, write, insert, release what the cache did not take."""
    slots = pool.alloc(len(tokens))
    write_tags(pool, cache, tokens, slots, 0)
    already = cache.insert(tokens, slots)
    n = cache.cacheable_length(len(tokens))
    pool.decref(slots[:already])
    pool.decref(slots[n:])
    return slots, already


# ----------------------------------------------------------------------------------- hand cases
def test_split_on_partial_match():
    pool, cache = make()
    slots, already = insert_fresh(pool, cache, [0, 1, 2, 3])  # "abcd"
    assert already == 0
    got, node = cache.match_prefix([0, 1, 9])  # "abx"
    assert got.tolist() == slots[:2].tolist()
    assert node.key == (0, 1) and list(node.children) == [2] and node.children[2].key == (2, 3)
    assert node.children[2].value.tolist() == slots[2:].tolist()
    assert node.parent is cache.root
    cache.check_invariants()
    full, leaf = cache.match_prefix(torch.tensor([0, 1, 2, 3, 3]))
    assert full.tolist() == slots.tolist() and leaf.key == (2, 3)
    none, root = cache.match_prefix([2, 1])
    assert none.numel() == 0 and root is cache.root
    assert pool.refcounts(slots).tolist() == [1, 1, 1, 1]  # splits do not change references


def test_insert_returns_cached_prefix_length():
    pool, cache = make()
    insert_fresh(pool, cache, [0, 1, 2, 3])
    slots, already = insert_fresh(pool, cache, [0, 1, 5, 6])
    assert already == 2
    assert pool.refcounts(slots[:2]).tolist() == [0, 0]  # the duplicates went back to the pool
    assert cache.total_cached_tokens == 6 and pool.used_pages == 6
    _, already = insert_fresh(pool, cache, [0, 1, 5])
    assert already == 3 and cache.total_cached_tokens == 6 and pool.used_pages == 6
    got, _ = cache.match_prefix([0, 1, 5, 6])
    check_match(pool, cache, [0, 1, 5, 6], got, cache.match_prefix([0, 1, 5, 6])[1])
    assert got[2:].tolist() == slots[2:].tolist()
    cache.check_invariants()


def test_insert_checks_its_input():
    pool, cache = make()
    with pytest.raises(ValueError, match="tokens but"):
        cache.insert([0, 1], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="free KV pages"):
        cache.insert([0, 1], torch.tensor([0, 1]))  # the caller holds no reference on those slots
    assert cache.total_cached_tokens == 0 and pool.free_pages == pool.num_pages


def test_lock_prevents_eviction():
    pool, cache = make()
    insert_fresh(pool, cache, [0, 1, 2])
    insert_fresh(pool, cache, [1, 1, 1])
    insert_fresh(pool, cache, [0, 1, 0])
    got, node = cache.match_prefix([0, 1, 2])
    cache.lock(node)
    assert cache.evictable_tokens == 4  # [1,1,1] and the [0] leaf under "01"
    assert cache.evict(100) == 4
    assert cache.total_cached_tokens == 3 and pool.used_pages == 3
    again, _ = cache.match_prefix([0, 1, 2])
    assert again.tolist() == got.tolist()
    check_match(pool, cache, [0, 1, 2], again, node)
    assert cache.evict(100) == 0
    cache.unlock(node)
    assert cache.evictable_tokens == 3
    assert cache.evict(1) == 1  # the leaf [2] only
    assert cache.total_cached_tokens == 2
    assert cache.evict(1) == 2  # then its parent, now a leaf
    assert pool.free_pages == pool.num_pages
    cache.check_invariants()


def test_lock_survives_splits():
    pool, cache = make()
    insert_fresh(pool, cache, [0, 1, 2, 0])
    _, leaf = cache.match_prefix([0, 1, 2, 0])
    cache.lock(leaf)
    _, upper = cache.match_prefix([0, 1, 1])  # splits the locked node
    assert upper.key == (0, 1) and upper.lock_ref == 1
    insert_fresh(pool, cache, [0, 1, 2, 2])  # splits it again, below
    assert leaf.lock_ref == 1 and leaf.parent.lock_ref == 1 and leaf.parent.parent is upper
    cache.check_invariants()
    assert cache.evict(100) == 1  # only the new leaf [2]
    cache.unlock(leaf)
    assert upper.lock_ref == 0 and leaf.parent.lock_ref == 0 and cache.evictable_tokens == 4
    with pytest.raises(RuntimeError, match="unbalanced"):
        cache.unlock(leaf)
    assert cache.evict(100) == 4
    with pytest.raises(RuntimeError, match="evicted"):
        cache.lock(leaf)
    assert pool.free_pages == pool.num_pages


def test_lru_order_of_eviction():
    pool, cache = make()
    a, _ = insert_fresh(pool, cache, [0, 0])
    b, _ = insert_fresh(pool, cache, [1, 1])
    c, _ = insert_fresh(pool, cache, [2, 2])
    cache.match_prefix([0, 0])  # a is now the most recently used
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 1])[0].numel() == 0  # b went first
    assert pool.refcounts(b).tolist() == [0, 0]
    assert cache.evict(1) == 2
    assert cache.match_prefix([2, 2])[0].numel() == 0 and cache.match_prefix([0, 0])[0].numel() == 2
    # leaves before their parents, parents once they become leaves
    insert_fresh(pool, cache, [1, 0, 1])
    insert_fresh(pool, cache, [1, 0, 2])
    cache.match_prefix([1, 0, 1])
    assert cache.evict(1) == 2  # [0, 0], used before both new paths
    assert cache.match_prefix([0, 0])[0].numel() == 0
    assert cache.evict(1) == 1  # leaf [2], older than the path [1, 0, 1] just matched
    assert cache.match_prefix([1, 0, 2])[0].numel() == 2
    assert cache.evict(2) == 3  # leaf [1] then its parent [1, 0], a leaf now
    assert cache.total_cached_tokens == 0 and pool.free_pages == pool.num_pages


def test_version_bump_never_reuses_old_kv():
    pool, cache = make()
    insert_fresh(pool, cache, [0, 1, 2])
    insert_fresh(pool, cache, [1, 2])
    old, node = cache.match_prefix([0, 1, 2])
    cache.lock(node)
    assert cache.bump_version() == 2  # the unlocked path [1, 2] is dropped at once
    assert cache.policy_version == 1
    assert pool.used_pages == 3  # the locked path keeps its pages for the request using them
    assert cache.match_prefix([0, 1, 2])[0].numel() == 0
    assert cache.match_prefix([1, 2])[0].numel() == 0
    assert cache.stale_tokens == 3 and cache.evictable_tokens == 0 and cache.evict(100) == 0
    cache.check_invariants()
    new, already = insert_fresh(pool, cache, [0, 1, 2])  # a fresh path beside the stale one
    assert already == 0
    got, new_node = cache.match_prefix([0, 1, 2])
    assert got.tolist() == new.tolist() and not set(got.tolist()) & set(old.tolist())
    check_match(pool, cache, [0, 1, 2], got, new_node)
    cache.unlock(node)  # the last lock of a stale node drops it
    assert pool.refcounts(old).tolist() == [0, 0, 0] and cache.stale_tokens == 0
    assert cache.total_cached_tokens == 3
    cache.check_invariants()
    cache.reset()
    assert pool.free_pages == pool.num_pages


def test_reset_refuses_while_locked():
    pool, cache = make()
    insert_fresh(pool, cache, [0, 1])
    _, node = cache.match_prefix([0, 1])
    cache.lock(node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    cache.reset(force=True)
    assert pool.free_pages == pool.num_pages and cache.total_cached_tokens == 0
    assert cache.match_prefix([0, 1])[0].numel() == 0


def test_page_size_2():
    pool, cache = make(num_pages=8, page_size=2)
    slots, already = insert_fresh(pool, cache, [0, 1, 2, 0, 1])  # caches 4 tokens; the 5th page stays the caller's
    assert already == 0 and cache.total_cached_tokens == 4 and pool.used_pages == 2
    got, node = cache.match_prefix([0, 1, 2, 0, 1])  # only whole pages match
    assert got.tolist() == slots[:4].tolist()
    got, node = cache.match_prefix([0, 1, 2, 1])  # the second page differs
    assert got.tolist() == slots[:2].tolist()
    got, node = cache.match_prefix([0, 1, 2])
    assert got.tolist() == slots[:2].tolist() and node.key == (0, 1)  # split at the page boundary
    got, node = cache.match_prefix([0, 2, 2, 2])
    assert got.numel() == 0 and node is cache.root
    cache.check_invariants()
    b, already = insert_fresh(pool, cache, [0, 1, 1, 1, 2, 2])
    assert already == 2 and pool.refcounts(b[:2]).tolist() == [0, 0]
    assert cache.total_cached_tokens == 8 and pool.used_pages == 4
    # misaligned slots are refused
    s = pool.alloc(4)
    with pytest.raises(ValueError, match="whole pages"):
        cache.insert([2, 2, 2, 2], s[[1, 0, 2, 3]])
    pool.decref(s)
    assert cache.evict(1) == 2  # the LRU leaf, the page (2, 0): whole pages leave
    assert cache.total_cached_tokens == 6 and pool.used_pages == 3
    assert cache.evict(3) == 4  # leaf (1, 1, 2, 2): the count is the node's, not the request's
    cache.reset()
    assert pool.free_pages == pool.num_pages
    with pytest.raises(ValueError, match="page_size"):
        RadixCache(pool, page_size=1)


def test_evict_pages_feeds_alloc_or_evict():
    pool, cache = make(num_pages=6)
    insert_fresh(pool, cache, [0, 0, 0])
    insert_fresh(pool, cache, [1, 1, 1])
    assert pool.free_pages == 0
    s = alloc_or_evict(pool, 2, cache.evict_pages)  # evicts the LRU path [0, 0, 0]
    assert s.numel() == 2 and cache.match_prefix([0, 0, 0])[0].numel() == 0
    assert cache.match_prefix([1, 1, 1])[0].numel() == 3
    # pages a request holds are not freed by eviction: the pool stays exhausted
    held, _ = cache.match_prefix([1, 1, 1])
    pool.incref(held)
    with pytest.raises(PoolExhausted):
        alloc_or_evict(pool, 2, cache.evict_pages)
    assert cache.total_cached_tokens == 0  # the cache did give up its entries
    pool.decref(held)
    pool.decref(s)
    assert pool.free_pages == pool.num_pages


# ------------------------------------------------------------------ random operation sequences
class Model:
    """Drives a pool + cache like an engine would and checks every invariant after each step."""

    def __init__(self, page_size, num_pages):
        self.pool, self.cache = make(num_pages, page_size)
        self.requests = []  # slot tensors; a request holds one reference on each of their pages
        self.locks = []  # (node, tokens, slots) at lock time

    # --- operations
    def request(self, tokens, finish_now):
        pool, cache = self.pool, self.cache
        matched, node = cache.match_prefix(tokens)
        check_match(pool, cache, tokens, matched, node)
        pool.incref(matched)  # pin before anything can evict
        need = len(tokens) - len(matched)
        try:
            fresh = alloc_or_evict(pool, need, cache.evict_pages)
        except (PoolExhausted, RequestTooLarge) as exc:
            assert isinstance(exc, PoolExhausted) or pool.pages_for(need) > pool.num_pages
            pool.decref(matched)
            return
        write_tags(pool, cache, tokens, fresh, len(matched))
        slots = torch.cat([matched, fresh])
        n = cache.cacheable_length(len(tokens))
        pool.incref(slots[:n])  # keep using the slots after insert
        already = cache.insert(tokens, slots)
        pool.decref(slots[:already])
        got, node = cache.match_prefix(tokens)
        assert len(got) == n
        check_match(pool, cache, tokens, got, node)
        if finish_now:
            pool.decref(slots)
        else:
            self.requests.append(slots)

    def blind_insert(self, tokens):
        """A path computed without matching first (its prefix may duplicate cached KV)."""
        try:
            slots = alloc_or_evict(self.pool, len(tokens), self.cache.evict_pages)
        except (PoolExhausted, RequestTooLarge):
            return
        write_tags(self.pool, self.cache, tokens, slots, 0)
        already = self.cache.insert(tokens, slots)
        self.pool.decref(slots[:already])
        self.pool.decref(slots[self.cache.cacheable_length(len(tokens)) :])

    def match(self, tokens):
        got, node = self.cache.match_prefix(tokens)
        check_match(self.pool, self.cache, tokens, got, node)

    def lock(self, tokens):
        got, node = self.cache.match_prefix(tokens)
        if node is self.cache.root:
            return
        self.cache.lock(node)
        self.locks.append((node, tuple(tokens[: len(got)]), got.clone()))

    def unlock(self, i):
        node, _, _ = self.locks.pop(i % len(self.locks))
        self.cache.unlock(node)

    def finish(self, i):
        self.pool.decref(self.requests.pop(i % len(self.requests)))

    def evict(self, n):
        before = self.cache.evictable_tokens
        freed = self.cache.evict(n)
        assert freed == before or freed >= n
        assert self.cache.evictable_tokens == before - freed

    def bump(self):
        self.cache.bump_version()
        assert self.cache.evictable_tokens == 0 and self.cache.matchable_tokens == 0

    # --- invariants
    def check(self):
        pool, cache = self.pool, self.cache
        cache.check_invariants()
        # (a) refcounts == references held by the cache's nodes + by live requests
        expected = np.zeros(pool.num_pages, dtype=np.int64)
        for node in cache.iter_nodes():
            expected[np.unique(node.value.numpy() // pool.page_size)] += 1
        for slots in self.requests:
            expected[np.unique(slots.numpy() // pool.page_size)] += 1
        assert pool.refcounts().tolist() == expected.tolist()
        free = pool._free
        assert len(free) == len(set(free)) and set(free) == set(np.flatnonzero(expected == 0).tolist())
        # (b) locked paths are intact: same tokens, same slots, KV untouched, lock counts right
        locks_below = {}
        for node, tokens, slots in self.locks:
            assert not node.dead
            assert path_tokens(cache, node) == tokens
            assert path_slots(cache, node).tolist() == slots.tolist()
            k, _ = pool.gather(0, slots)
            assert k.view(-1).tolist() == [prefix_code(tokens[: j + 1]) for j in range(len(tokens))]
            while node is not cache.root:
                locks_below[node.id] = locks_below.get(node.id, 0) + 1
                node = node.parent
        for node in cache.iter_nodes():
            assert node.lock_ref == locks_below.get(node.id, 0)

    def finish_all(self):
        while self.locks:
            self.unlock(0)
        while self.requests:
            self.finish(0)
        self.check()
        self.cache.reset()
        # (e) no leak
        assert self.pool.free_pages == self.pool.num_pages and self.pool.refcounts().sum() == 0
        assert self.cache.total_cached_tokens == 0


tokens_st = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)


class CacheMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 1, 2]), num_pages=st.integers(5, 20))
    def setup(self, page_size, num_pages):
        self.m = Model(page_size, num_pages)

    @rule(tokens=tokens_st, finish_now=st.booleans())
    def request(self, tokens, finish_now):
        self.m.request(tokens, finish_now)

    @rule(tokens=tokens_st)
    def blind_insert(self, tokens):
        self.m.blind_insert(tokens)

    @rule(tokens=tokens_st)
    def match(self, tokens):
        self.m.match(tokens)

    @rule(tokens=tokens_st)
    def lock(self, tokens):
        self.m.lock(tokens)

    @precondition(lambda self: self.m.locks)
    @rule(i=st.integers(0, 50))
    def unlock(self, i):
        self.m.unlock(i)

    @precondition(lambda self: self.m.requests)
    @rule(i=st.integers(0, 50))
    def finish(self, i):
        self.m.finish(i)

    @rule(n=st.integers(0, 12))
    def evict(self, n):
        self.m.evict(n)

    @rule()
    def bump(self):
        self.m.bump()

    @invariant()
    def consistent(self):
        if hasattr(self, "m"):
            self.m.check()

    def teardown(self):
        if hasattr(self, "m"):
            self.m.finish_all()


CacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCacheMachine = CacheMachine.TestCase


@pytest.mark.parametrize("seed,page_size", [(0, 1), (1, 1), (2, 2)])
def test_long_random_sequences(seed, page_size):
    rng = random.Random(seed)
    m = Model(page_size, num_pages=24)
    ops = (
        ["request"] * 4
        + ["blind"] * 2
        + ["match", "lock", "unlock", "finish", "finish", "evict"]
        + (["bump"] if seed != 1 else [])
    )  # seed 1: no bumps, so the tree grows deep and splits a lot
    for _ in range(400):
        tokens = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 10))]
        op = rng.choice(ops)
        if op == "request":
            m.request(tokens, finish_now=rng.random() < 0.5)
        elif op == "blind":
            m.blind_insert(tokens)
        elif op == "match":
            m.match(tokens)
        elif op == "lock":
            m.lock(tokens)
        elif op == "unlock" and m.locks:
            m.unlock(rng.randrange(len(m.locks)))
        elif op == "finish" and m.requests:
            m.finish(rng.randrange(len(m.requests)))
        elif op == "evict":
            m.evict(rng.randint(0, 8))
        elif op == "bump":
            m.bump()
        m.check()
    m.finish_all()
