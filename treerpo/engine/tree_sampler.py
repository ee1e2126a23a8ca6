"""TreeSampler: expands a batch of trees over the KV pool, every shared prefix computed and stored once.

A prompt is prefilled once (identical prompts in a batch share one prefill, and the radix
cache serves prompts seen earlier under the same weights). A node's children all fork from
the logits after the parent's last token, and read the parent's KV slots instead of
recomputing them. All live branches of all running trees decode together; when a tree
finishes, its slots are freed and waiting trees are admitted (continuous batching). A tree
is admitted only when its worst-case slot count fits, so a batch larger than the pool
waits, never fails half-way.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..generation import eos_token_ids
from ..reference_sampler import check_prompt_lengths
from ..tree import Tree, TreeSpec
from .kv_pool import KVPool, RequestTooLarge
from .model_runner import ModelRunner, SequenceStep, SharedPrefixes, kv_shape
from .radix_cache import RadixCache
from .sampling import SamplingParams, sample_next


@dataclass
class _Branch:
    tree: int
    parent: int  # record index of the parent node (0 = the prompt)
    child_index: int
    depth: int  # 1-based level of the node this branch is generating
    path_slots: np.ndarray  # int64 slots of everything before this segment
    generator: torch.Generator | None
    seed_path: tuple
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    own_slots: list[int] = field(default_factory=list)
    done: bool = False  # completed: its own slots belong to the tree's slots_to_free


@dataclass
class _TreeState:
    prompt: list[int]
    info: dict
    seed: int | None
    worst_tokens: int
    radix_node: object = None
    prompt_slots: torch.Tensor | None = None
    live: int = 0
    used_tokens: int = 0
    # generated nodes, in completion order: (parent record, child index, tokens, logprobs, finished)
    records: list = field(default_factory=list)
    slots_to_free: list = field(default_factory=list)


def _child_seed(tree_seed: int, seed_path: tuple) -> int:
    return int(np.random.SeedSequence([tree_seed, *seed_path]).generate_state(1)[0])


class TreeSampler:
    """Samples trees with prefix sharing. ``pool_tokens`` or ``memory_bytes`` sizes the KV pool."""

    def __init__(self, model, tokenizer, pool_tokens: int | None = None, memory_bytes: int | None = None,
                 truncate_prompts: bool = False, stop_strings: Sequence[str] = (), share_prefixes: bool = True,
                 ignore_eos: bool = False, cascade: bool = True, eos_ids: Sequence[int] | None = None):
        """``share_prefixes=False`` prefills every tree's prompt on its own and skips the radix cache (the
        baseline of benchmarks); ``ignore_eos`` generates full segments whatever is sampled (throughput runs);
        ``cascade=False`` decodes every branch over its whole path instead of reading the path its siblings
        share once per sibling group where ``ModelRunner.cascade_pays`` (same tokens, for comparisons).
        ``eos_ids`` end a segment (default: the model's generation config's and the tokenizer's EOS)."""
        self.model = model
        self.tokenizer = tokenizer
        self.truncate_prompts = truncate_prompts
        self.stop_strings = tuple(stop_strings)
        layers, kv_heads, head_dim = kv_shape(model.config)
        device = next(model.parameters()).device
        if pool_tokens is None and memory_bytes is None:
            pool_tokens = 1 << 16
        self.pool = KVPool(layers, kv_heads, head_dim, next(model.parameters()).dtype, device, page_size=1,
                           num_pages=pool_tokens, memory_bytes=memory_bytes if pool_tokens is None else None)
        self.cache = RadixCache(self.pool)
        self.runner = ModelRunner(model, self.pool)
        self.eos = set() if ignore_eos else set(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer)
        self.share_prefixes = share_prefixes
        self.cascade = cascade
        self._weights_version = self._current_weights_version()

    def on_weights_updated(self) -> None:
        """Call after every optimizer step: KV computed with the old weights is never reused."""
        self.cache.bump_version()
        self._weights_version = self._current_weights_version()

    def _current_weights_version(self) -> tuple[int, ...]:
        """In-place changes (``optimizer.step``, ``load_state_dict``, ``copy_``) bump a parameter's version, new
        storage moves its pointer; writes through ``.data`` do neither: announce those with on_weights_updated."""
        return tuple((p._version, p.data_ptr()) for p in self.model.parameters())

    def _forget_stale_kv(self) -> None:
        """A weight change nobody announced with ``on_weights_updated`` still retires the cached K/V."""
        version = self._current_weights_version()
        if version != self._weights_version:
            self.cache.bump_version()
            self._weights_version = version

    # ---- public ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], spec: TreeSpec, infos: Sequence[dict] | None = None,
               seeds: Sequence[int] | None = None) -> list[Tree]:
        """One tree per prompt. With ``seeds`` every tree draws from its own generators (same seed, same tree);
        without, from torch's global RNG."""
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        prompts = check_prompt_lengths(prompts, spec, max_positions, self.truncate_prompts)
        infos = list(infos) if infos is not None else [{} for _ in prompts]
        params = SamplingParams(spec.temperature, spec.top_p)
        states = [_TreeState(p, info, None if seeds is None else int(seeds[i]), len(p) + spec.max_generated_tokens)
                  for i, (p, info) in enumerate(zip(prompts, infos))]
        for i, st in enumerate(states):
            if st.worst_tokens > self.pool.capacity_tokens:
                raise RequestTooLarge(
                    f"tree {i} may need {st.worst_tokens} KV slots (prompt {len(st.prompt)} + up to "
                    f"{spec.max_generated_tokens} generated) but the pool holds {self.pool.capacity_tokens}; "
                    "give the sampler a larger pool (pool_tokens / memory_bytes) or a smaller tree")
        self._forget_stale_kv()
        was_training = self.model.training
        self.model.eval()
        try:
            self._run(states, spec, params)
        finally:
            self.model.train(was_training)
        return [self._build_tree(st) for st in states]

    # ---- scheduling --------------------------------------------------------------------------------
    def _run(self, states: list[_TreeState], spec: TreeSpec, params: SamplingParams) -> None:
        waiting = deque(range(len(states)))
        running: set[int] = set()
        pending: list[tuple[_Branch, int]] = []  # branches with a sampled token to feed
        try:
            while waiting or pending:
                admitted = self._admit(states, waiting, running)
                pending.extend(self._prefill(states, admitted, spec, params))
                if pending:
                    pending = self._decode(states, pending, spec, params)
                for t in [t for t in running if states[t].live == 0]:  # also trees whose branches all ended at once
                    self._release(states[t])
                    running.discard(t)
        except BaseException:  # a forward that raised, non-finite logits, Ctrl-C: give back every slot and lock
            self._abandon(states, running, pending)
            raise

    def _abandon(self, states, running, pending) -> None:
        for b, _ in pending:
            if not b.done:
                states[b.tree].slots_to_free.extend(b.own_slots)
                b.done = True
        for t in running:
            self._release(states[t])

    def _outstanding(self, states, running) -> int:
        return sum(states[t].worst_tokens - states[t].used_tokens for t in running)

    def _admit(self, states, waiting, running) -> list[int]:
        admitted = []
        while waiting:
            need = states[waiting[0]].worst_tokens
            short = need + self._outstanding(states, running) - self.pool.free_tokens
            if short > 0:
                short -= self.cache.evict_pages(short)
            if short > 0:
                if not running and not admitted:
                    raise RuntimeError(
                        f"tree {waiting[0]} needs {need} KV slots but only {self.pool.free_tokens} are free after "
                        f"evicting the cache ({self.cache.total_cached_tokens} cached tokens are locked); "
                        "give the sampler a larger pool (kv_pool_tokens / memory_bytes)")
                break
            t = waiting.popleft()
            running.add(t)
            admitted.append(t)
        return admitted

    def _release(self, st: _TreeState) -> None:
        if st.slots_to_free:
            self.pool.decref(torch.tensor(st.slots_to_free, dtype=torch.long))
            st.slots_to_free = []
        if st.radix_node is not None:
            self.cache.unlock(st.radix_node)
            st.radix_node = None

    # ---- prefill -----------------------------------------------------------------------------------
    def _prefill(self, states, admitted, spec, params) -> list[tuple[_Branch, int]]:
        if not admitted:
            return []
        if not self.share_prefixes:
            return self._prefill_unshared(states, admitted, spec, params)
        groups: dict[tuple, list[int]] = {}
        for t in admitted:
            groups.setdefault(tuple(states[t].prompt), []).append(t)
        steps, keys = [], list(groups)
        try:
            for key in keys:
                matched, _ = self.cache.match_prefix(list(key[:-1]))
                new_tokens = list(key[len(matched):])
                steps.append(SequenceStep(matched, new_tokens, self.pool.alloc(len(new_tokens))))
            logits = self.runner.forward(steps)
        except BaseException:  # nobody owns the new slots yet
            for step in steps:
                self.pool.decref(step.new_slots)
            raise
        for key, step in zip(keys, steps):  # every new slot in the cache first: a failing fork leaks none
            already = self.cache.insert(list(key), torch.cat([step.cached_slots, step.new_slots]))
            duplicate = step.new_slots[:max(0, already - len(step.cached_slots))]
            if len(duplicate):
                self.pool.decref(duplicate)
        pending = []
        for key, row in zip(keys, logits):
            prompt_slots, node = self.cache.match_prefix(list(key))
            path = prompt_slots.numpy()  # one array for all trees of this prompt: their branches form one group
            for t in groups[key]:
                st = states[t]
                self.cache.lock(node)
                st.radix_node, st.prompt_slots = node, prompt_slots
                st.used_tokens += len(key)
                pending.extend(self._fork(st, t, parent=0, depth=1, path_slots=path, seed_path=(),
                                          logits=row, spec=spec, params=params))
        return pending

    def _prefill_unshared(self, states, admitted, spec, params):
        steps = []
        for t in admitted:
            steps.append(SequenceStep(torch.zeros(0, dtype=torch.long), states[t].prompt,
                                      self.pool.alloc(len(states[t].prompt))))
            states[t].slots_to_free.extend(steps[-1].new_slots.tolist())
        logits = self.runner.forward(steps)
        pending = []
        for t, step, row in zip(admitted, steps, logits):
            st = states[t]
            st.prompt_slots = step.new_slots
            st.used_tokens += len(st.prompt)
            pending.extend(self._fork(st, t, 0, 1, step.new_slots, (), row, spec, params))
        return pending

    # ---- decode ------------------------------------------------------------------------------------
    def _fork(self, st, t, parent, depth, path_slots, seed_path, logits, spec, params):
        """Branches of one node; they all hold the same ``path_slots`` array, the key of their decode group."""
        path_slots = np.asarray(path_slots, dtype=np.int64)
        branches = []
        for c in range(spec.branching[depth - 1]):
            path = (*seed_path, c)
            gen = None
            if st.seed is not None:
                gen = torch.Generator(device=logits.device).manual_seed(_child_seed(st.seed, path))
            branches.append(_Branch(t, parent, c, depth, path_slots, gen, path))
        st.live += len(branches)
        return self._sample_into(branches, logits.expand(len(branches), -1), {t: st}, spec, params)

    def _sample_into(self, branches, logits, states_by_tree, spec, params):
        """Sample one token for each branch; return those that need feeding."""
        gens = [b.generator for b in branches] if branches and branches[0].generator is not None else None
        tokens, logps = sample_next(logits, params, gens)
        pending = []
        for b, tok, lp in zip(branches, tokens.tolist(), logps.tolist()):
            b.tokens.append(tok)
            b.logprobs.append(lp)
            st = states_by_tree[b.tree]
            if tok in self.eos or self._hit_stop_string(b):
                self._complete(st, b, finished=True)
            elif len(b.tokens) == spec.segment_tokens and b.depth == spec.depth:
                self._complete(st, b, finished=False)
            else:
                pending.append((b, tok))
        return pending

    def _hit_stop_string(self, b: _Branch) -> bool:
        if not self.stop_strings:
            return False
        tail = self.tokenizer.decode(b.tokens[-8:])
        return any(tail.endswith(s) for s in self.stop_strings)

    def _complete(self, st: _TreeState, b: _Branch, finished: bool) -> int:
        st.records.append((b.parent, b.child_index, b.tokens, b.logprobs, finished))
        st.slots_to_free.extend(b.own_slots)
        b.done = True
        st.live -= 1
        return len(st.records)  # record index of this node (the prompt is 0)

    def _decode(self, states, pending, spec, params):
        slots = self.pool.alloc(len(pending)).numpy()
        try:
            steps, shared = self._decode_steps(pending, slots)
        finally:  # owned by their branches from here on, so an exception frees them with the branch
            for i, (b, _) in enumerate(pending):
                b.own_slots.append(int(slots[i]))
                states[b.tree].used_tokens += 1
        logits = self.runner.forward(steps, shared)
        next_pending, continuing, cont_rows = [], [], []
        for row, (b, _) in enumerate(pending):
            if len(b.tokens) == spec.segment_tokens:  # segment done: its children fork from these logits
                st = states[b.tree]
                node = self._complete(st, b, finished=False)
                path_slots = self._slots_of(b)
                next_pending.extend(self._fork(st, b.tree, node, b.depth + 1, path_slots, b.seed_path,
                                               logits[row], spec, params))
            else:
                continuing.append(b)
                cont_rows.append(row)
        if continuing:
            by_tree = {b.tree: states[b.tree] for b in continuing}
            next_pending.extend(self._sample_into(continuing, logits[cont_rows], by_tree, spec, params))
        return next_pending

    def _decode_steps(self, pending, slots) -> tuple[list[SequenceStep], SharedPrefixes | None]:
        """One step per branch: over its own slots after the path its siblings share, read once per group, when
        the cascade is on and pays; else over its whole path."""
        if self.cascade:
            shared = self._sibling_groups(pending)
            if self.runner.cascade_pays(shared):
                return [SequenceStep(np.asarray(b.own_slots, dtype=np.int64), [tok], slots[i:i + 1])
                        for i, (b, tok) in enumerate(pending)], shared
        return [SequenceStep(self._slots_of(b), [tok], slots[i:i + 1]) for i, (b, tok) in enumerate(pending)], None

    @staticmethod
    def _sibling_groups(pending) -> SharedPrefixes:
        """Branches grouped by the path they fork from (siblings, or every depth-1 branch of the trees of one
        prompt): the deepest prefix they all share, found by the identity of the array they hold."""
        group_of_path: dict[int, int] = {}
        prefixes, group_of_step = [], np.empty(len(pending), dtype=np.int64)
        for i, (b, _) in enumerate(pending):
            group = group_of_step[i] = group_of_path.setdefault(id(b.path_slots), len(prefixes))
            if group == len(prefixes):
                prefixes.append(b.path_slots)
        return SharedPrefixes(prefixes, group_of_step)

    @staticmethod
    def _slots_of(b: _Branch) -> np.ndarray:
        return np.concatenate([b.path_slots, np.asarray(b.own_slots, dtype=np.int64)])

    # ---- output ------------------------------------------------------------------------------------
    def _build_tree(self, st: _TreeState) -> Tree:
        """Renumber nodes breadth-first (children in order), the layout of the reference sampler."""
        children: dict[int, list[tuple[int, int]]] = {}
        for rec_id, (parent, child_index, *_rest) in enumerate(st.records, start=1):
            children.setdefault(parent, []).append((child_index, rec_id))
        order, new_id, queue = [], {0: 0}, deque([0])
        while queue:
            node = queue.popleft()
            for _, rec_id in sorted(children.get(node, [])):
                new_id[rec_id] = len(order) + 1
                order.append(rec_id)
                queue.append(rec_id)
        recs = [st.records[r - 1] for r in order]
        tree = Tree.from_segments(st.prompt, [new_id[r[0]] for r in recs], [r[2] for r in recs],
                                  [r[4] for r in recs], st.info)
        tree.token_logprobs = np.concatenate([np.full(len(st.prompt), np.nan)] +
                                             [np.asarray(r[3], dtype=np.float64) for r in recs])
        return tree
