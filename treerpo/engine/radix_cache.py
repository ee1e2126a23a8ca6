"""A radix tree over token ids whose nodes hold KV-pool slots: prefix reuse across requests.

Each node holds a run of tokens (``key``) and the pool slots holding their K/V (``value``,
same length); the path from the root spells a token prefix. ``match_prefix`` finds the
longest cached prefix of a sequence (splitting a node when the match ends inside it),
``insert`` adds a computed path, ``evict`` drops least-recently-used unlocked leaves.

Ownership (who holds a reference on a pool page)
------------------------------------------------
* The cache holds exactly one reference on every page of every node it keeps, and drops
  it when it evicts the node, drops it at a version bump, or is reset.
* ``insert(tokens, slots)`` *takes over* the caller's reference on the slots it adds
  (``slots[already:n]``, no incref; ``already`` is its return value, ``n`` the path
  length, rounded down to whole pages): after the call the caller owns only
  - ``slots[:already]`` that it allocated itself: duplicates of KV the cache already had;
    decref them (and use the cached slots from ``match_prefix`` instead);
  - with ``page_size > 1``, the slots of a trailing partial page (never cached).
  To keep using inserted slots, ``lock`` the node that ``match_prefix(tokens)`` returns,
  or ``pool.incref`` them *before* inserting (then decref them when done).
  The two recipes, for a caller holding one reference on every slot of ``s``
  (``n = cache.cacheable_length(len(t))``):
  - done with ``s``:  ``a = insert(t, s); pool.decref(s[:a]); pool.decref(s[n:])``
  - keeps ``s``:      ``pool.incref(s[:n]); a = insert(t, s); pool.decref(s[:a])``
    (it still holds exactly one reference on every slot of ``s``; release at finish).
  Beware the caller whose matched prefix was evicted between ``match_prefix`` and
  ``insert``: ``a`` is then shorter than the match, and ``insert`` takes a reference on
  matched slots too. The recipes above stay right whatever ``a`` is.
* ``match_prefix`` takes no reference. Before anything can evict (``evict``,
  ``evict_pages``, a version bump), pin what was matched: ``lock(node)`` or
  ``pool.incref(slots)``. Otherwise the matched pages may be freed and handed out again.
* A running request holds its own references (slots it allocated and did not hand to the
  cache, cached slots it incref'd) and decrefs them when it finishes. A page returns to
  the free list only when nobody holds it: evicting a node whose pages a request incref'd
  drops only the cache's reference.
* ``lock(node)`` pins the path root..node against eviction (nested counts). A lock is
  not a page reference; a locked path keeps the cache's own references alive, across a
  version bump too (the node turns stale, see below).

Page size
---------
With ``page_size > 1`` (the pool's) the cache works in whole pages: keys are matched page
by page (children are keyed by their first page of tokens), ``match_prefix`` returns a
multiple of ``page_size`` tokens, ``insert`` caches only the page-aligned head of a path
(the tail of a partial page stays the caller's alone), and the inserted slots must be
whole pages in order (``slots[j*ps + o] == page*ps + o``; pages from ``pool.alloc``
satisfy this when a request's fresh tokens start on a page boundary, which they do after a
page-aligned match). Every page then belongs to exactly one node, and splits happen only
at page boundaries. Page size 1 (the default) shares every token at a branch point.

Policy versions
---------------
KV is valid only for the weights that computed it. ``bump_version()`` (call it after every
optimizer step) drops every unlocked node and detaches the locked ones as *stale*: they
keep their pages (a running request may read them) but are never matched and never
extended; each is dropped as soon as its last lock goes. New inserts build a fresh tree of
current-version nodes beside them. ``match_prefix`` therefore never returns KV of an older
version.

The tree does not remember logits: when a whole sequence is cached, a caller that needs
the next-token distribution should match ``tokens[:-1]`` and recompute the last token.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Iterator

import torch

from treerpo.engine.kv_pool import KVPool

__all__ = ["RadixCache", "TreeNode"]

_ids = itertools.count()


class TreeNode:
    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access", "version", "id", "dead")

    def __init__(
        self,
        key: tuple,
        value: torch.Tensor,
        parent: "TreeNode | None",
        version: int,
        last_access: int = 0,
        lock_ref: int = 0,
    ):
        self.key = key
        self.value = value
        self.children: dict = {}
        self.parent = parent
        self.lock_ref = lock_ref
        self.last_access = last_access
        self.version = version
        self.id = next(_ids)
        self.dead = False  # evicted, dropped or reset: no longer part of the cache

    def __repr__(self) -> str:
        return (
            f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref}, version={self.version}, "
            f"children={len(self.children)}{', dead' if self.dead else ''})"
        )


def _as_key(tokens) -> tuple:
    if isinstance(tokens, tuple):
        return tokens
    if isinstance(tokens, torch.Tensor):
        return tuple(tokens.reshape(-1).tolist())
    if hasattr(tokens, "tolist"):  # numpy
        return tuple(tokens.tolist())
    return tuple(int(t) for t in tokens)


def _as_slots(slots) -> torch.Tensor:
    if not isinstance(slots, torch.Tensor):
        slots = torch.as_tensor(slots, dtype=torch.long)
    return slots.detach().reshape(-1).to("cpu", torch.long)


class RadixCache:
    def __init__(self, pool: KVPool, page_size: int | None = None):
        if page_size is None:
            page_size = pool.page_size
        if page_size != pool.page_size:
            raise ValueError(f"RadixCache page_size ({page_size}) must equal the pool's ({pool.page_size})")
        self.pool = pool
        self.page_size = int(page_size)
        self.policy_version = 0
        self._clock = 0
        self.root = TreeNode((), torch.zeros(0, dtype=torch.long), None, version=-1)
        self._stale: set[TreeNode] = set()
        self._current_tokens = 0  # tokens in the matchable (current-version) tree
        self._locked_tokens = 0  # of which on locked nodes
        self._stale_tokens = 0

    # ---------------------------------------------------------------- helpers
    def _child_key(self, key: tuple, i: int):
        return key[i] if self.page_size == 1 else key[i : i + self.page_size]

    def _match_len(self, node_key: tuple, key: tuple, start: int) -> int:
        n = min(len(node_key), len(key) - start)
        if node_key[:n] == key[start : start + n]:
            i = n
        else:
            i = 0
            while node_key[i] == key[start + i]:
                i += 1
        return i - i % self.page_size if self.page_size > 1 else i

    def cacheable_length(self, num_tokens: int) -> int:
        """How many leading tokens of a path of ``num_tokens`` insert would cache (whole pages)."""
        return num_tokens - num_tokens % self.page_size

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _split(self, node: TreeNode, m: int) -> TreeNode:
        """Cut ``node`` after its first ``m`` tokens; returns the new upper part (same locks)."""
        upper = TreeNode(node.key[:m], node.value[:m], node.parent, node.version, node.last_access, node.lock_ref)
        upper.children = {self._child_key(node.key, m): node}
        node.parent.children[self._child_key(node.key, 0)] = upper
        node.key = node.key[m:]
        node.value = node.value[m:]
        node.parent = upper
        return upper

    def _release(self, node: TreeNode) -> None:
        self.pool.decref(node.value)
        node.dead = True

    # ------------------------------------------------------------------ match
    def match_prefix(self, tokens) -> tuple[torch.Tensor, TreeNode]:
        """(slots of the longest cached current-version prefix, its last node). Takes no references."""
        key = _as_key(tokens)
        if self.page_size > 1:
            key = key[: len(key) - len(key) % self.page_size]
        now = self._tick()
        node, i, values = self.root, 0, []
        while i < len(key):
            child = node.children.get(self._child_key(key, i))
            if child is None or child.version != self.policy_version:
                break
            m = self._match_len(child.key, key, i)
            if m == 0:
                break
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = now
            values.append(child.value)
            node, i = child, i + m
        if not values:
            return torch.zeros(0, dtype=torch.long), node
        return (values[0] if len(values) == 1 else torch.cat(values)), node

    # ----------------------------------------------------------------- insert
    def insert(self, tokens, slots) -> int:
        """Cache the path ``tokens`` whose K/V sit in ``slots``; returns how many leading tokens were cached already.

        The cache takes over the caller's reference on ``slots[already:n]`` (``n``: the
        whole path, or its page-aligned head when page_size > 1); the caller keeps its
        references on ``slots[:already]`` (decref its own duplicates there) and ``slots[n:]``.
        """
        key = _as_key(tokens)
        slots = _as_slots(slots)
        if len(key) != len(slots):
            raise ValueError(f"insert: {len(key)} tokens but {len(slots)} slots")
        ps = self.page_size
        n = len(key) - len(key) % ps
        if ps > 1 and n:
            pages = slots[:n].view(-1, ps)
            if not (bool((pages[:, 0] % ps == 0).all()) and bool((pages - pages[:, :1] == torch.arange(ps)).all())):
                raise ValueError(
                    f"insert: with page_size {ps} the slots must be whole pages in order "
                    f"(slots[j*{ps} + o] == page*{ps} + o)"
                )
        now = self._tick()
        node, i = self.root, 0
        while i < n:
            child = node.children.get(self._child_key(key, i))
            if child is None:
                break
            m = self._match_len(child.key, key, i)
            if m == 0:  # pragma: no cover - children are keyed by their first token/page
                break
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = now
            node, i = child, i + m
        cached = i
        if i < n:
            value = slots[i:n].clone()
            if (self.pool.refcounts(value) <= 0).any():
                raise RuntimeError(
                    "insert of slots on free KV pages: the caller must hold a reference on the slots "
                    "it inserts (the cache takes that reference over)"
                )
            leaf = TreeNode(key[i:n], value, node, self.policy_version, now)
            node.children[self._child_key(key, i)] = leaf
            self._current_tokens += n - i
        return cached

    # ------------------------------------------------------------ lock/unlock
    def lock(self, node: TreeNode) -> None:
        """Pin ``node`` and its ancestors against eviction (counts nest)."""
        if node.dead:
            raise RuntimeError(f"lock of {node}: the node was evicted or reset; lock the node match_prefix returns")
        current = node.version == self.policy_version
        while node is not self.root:
            if node.lock_ref == 0 and current:
                self._locked_tokens += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one :meth:`lock`; stale nodes whose last lock goes are dropped (their pages decref'd)."""
        if node is self.root:
            return
        if node.dead or node.lock_ref <= 0:
            raise RuntimeError(f"unlock of {node} that holds no lock (unbalanced lock/unlock)")
        while node is not self.root:  # ancestors hold at least as many locks as node
            node.lock_ref -= 1
            if node.lock_ref == 0:
                if node.version == self.policy_version:
                    self._locked_tokens -= len(node.key)
                else:  # stale: no descendant is left (they are unlocked, hence already dropped)
                    self._stale.discard(node)
                    self._stale_tokens -= len(node.key)
                    self._release(node)
            node = node.parent

    # ------------------------------------------------------------------ evict
    def _evict(self, done) -> int:
        heap = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.lock_ref == 0:
                heap.append((node.last_access, node.id, node))
        heapq.heapify(heap)
        freed = 0
        while heap and not done(freed):
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[self._child_key(node.key, 0)]
            self._release(node)
            freed += len(node.key)
            self._current_tokens -= len(node.key)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    def evict(self, num_tokens: int) -> int:
        """Drop least-recently-used unlocked leaves until ``num_tokens`` tokens left the cache; returns that count.

        Tokens leave the cache in whole nodes (whole pages), so the count can exceed the request.
        """
        return self._evict(lambda freed: freed >= num_tokens)

    def evict_pages(self, num_pages: int) -> int:
        """Evict until the pool really gained ``num_pages`` free pages (or nothing is evictable).

        Returns the pages the pool gained: what an allocator that evicts before it allocates needs.
        """
        before = self.pool.free_pages
        self._evict(lambda _freed: self.pool.free_pages - before >= num_pages)
        return self.pool.free_pages - before

    # ---------------------------------------------------------------- version
    def bump_version(self) -> int:
        """New weights: drop every unlocked node, keep locked ones as stale; returns tokens dropped."""
        self.policy_version += 1
        dropped = 0
        stack = list(self.root.children.values())
        self.root.children = {}
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.children = {}
            if node.lock_ref == 0:
                self._release(node)
                dropped += len(node.key)
            else:
                self._stale.add(node)
                self._stale_tokens += len(node.key)
        self._current_tokens = 0
        self._locked_tokens = 0
        return dropped

    # ------------------------------------------------------------------ reset
    def reset(self, force: bool = False) -> None:
        """Drop everything and release the cache's references.

        Refuses while nodes are locked (a live request relies on them) unless ``force``.
        """
        if not force and (self._locked_tokens or self._stale):
            raise RuntimeError(
                f"reset of a radix cache with locked nodes ({self._locked_tokens} current, "
                f"{self._stale_tokens} stale tokens): unlock them first, or reset(force=True)"
            )
        for node in list(self.iter_nodes()):
            self._release(node)
            node.children = {}
        self.root.children = {}
        self._stale = set()
        self._current_tokens = self._locked_tokens = self._stale_tokens = 0

    # ------------------------------------------------------------- inspection
    @property
    def total_cached_tokens(self) -> int:
        """Tokens the cache holds references on (matchable ones plus stale locked ones)."""
        return self._current_tokens + self._stale_tokens

    @property
    def matchable_tokens(self) -> int:
        return self._current_tokens

    @property
    def stale_tokens(self) -> int:
        return self._stale_tokens

    @property
    def evictable_tokens(self) -> int:
        return self._current_tokens - self._locked_tokens

    def iter_nodes(self, include_stale: bool = True) -> Iterator[TreeNode]:
        """Every node the cache holds (root excluded), current tree first."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
        if include_stale:
            yield from list(self._stale)

    def check_invariants(self) -> None:
        """Raise AssertionError if the structure or its counters are inconsistent (tests, debugging)."""
        ps = self.page_size
        total = locked = 0
        for node in self.iter_nodes(include_stale=False):
            assert not node.dead and node.version == self.policy_version, node
            assert len(node.key) > 0 and len(node.key) == len(node.value) and len(node.key) % ps == 0, node
            assert node.parent.children.get(self._child_key(node.key, 0)) is node, node
            assert node.parent is self.root or node.parent.version == self.policy_version, node
            assert node.lock_ref >= 0 and node.lock_ref >= sum(c.lock_ref for c in node.children.values()), node
            total += len(node.key)
            locked += len(node.key) if node.lock_ref else 0
        stale = 0
        for node in self._stale:
            assert not node.dead and node.version != self.policy_version and node.lock_ref > 0, node
            assert not node.children and (node.parent is self.root or node.parent in self._stale), node
            stale += len(node.key)
        assert (total, locked, stale) == (self._current_tokens, self._locked_tokens, self._stale_tokens), (
            (total, locked, stale),
            (self._current_tokens, self._locked_tokens, self._stale_tokens),
        )

    def __repr__(self) -> str:
        return (
            f"RadixCache(version={self.policy_version}, tokens={self._current_tokens}, "
            f"locked={self._locked_tokens}, stale={self._stale_tokens}, page_size={self.page_size})"
        )
