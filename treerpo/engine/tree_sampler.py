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

import time
from typing import Sequence

import numpy as np
import torch

from treerpo.engine.block_manager import BlockManager
from treerpo.engine.branch_seeds import child_seeds, root_seeds, uniforms
from treerpo.engine.kv_pool import KVPool
from treerpo.engine.model_runner import ModelRunner, kv_shape
from treerpo.engine.radix_cache import RadixCache
from treerpo.engine.sampling import SamplingParams
from treerpo.engine.scheduler import Scheduler, worst_case_tokens
from treerpo.engine.sequence import ROOT, Branches, NodeRecords, children_of, roots
from treerpo.engine.step_builder import HostStaging, decode_bucket, decode_inputs, repeated_path_keys, sequence_inputs
from treerpo.engine.step_draw import DEFAULT_DRAW_MEMORY_BYTES, draw_step
from treerpo.engine.weights_watch import WeightsWatch
from treerpo.sampling.generation import eos_token_ids
from treerpo.sampling.prompt_rules import check_prompt_lengths, infos_for
from treerpo.tree import Tree, TreeSpec


class TreeSampler:
    """Samples trees with prefix sharing. ``pool_tokens`` or ``memory_bytes`` sizes the KV pool."""

    def __init__(
        self,
        model,
        tokenizer,
        pool_tokens: int | None = None,
        memory_bytes: int | None = None,
        truncate_prompts: bool = False,
        stop_strings: Sequence[str] = (),
        share_prefixes: bool = True,
        ignore_eos: bool = False,
        cascade: bool = True,
        eos_ids: Sequence[int] | None = None,
        draw_memory_bytes: int = DEFAULT_DRAW_MEMORY_BYTES,
        kv_dtype: torch.dtype | None = None,
        head_precision: str = "model",
        compile: bool = False,
    ):
        """``share_prefixes=False`` prefills every tree's prompt on its own and skips the radix cache (the
        baseline of benchmarks); ``ignore_eos`` generates full segments whatever is sampled (throughput runs);
        ``cascade=False`` decodes every branch over its whole path instead of reading the path its siblings
        share once per sibling group where ``ModelRunner.cascade_spares_enough`` (same tokens, for comparisons).
        ``eos_ids`` end a segment (default: the model's generation config's and the tokenizer's EOS).
        ``draw_memory_bytes`` bounds a step's logits and draw buffers: the LM head and the draw run on chunks of
        that many bytes' worth of rows (``step_draw``), so a step's memory does not grow with its branches.
        ``kv_dtype``: the dtype the model computes in, default its parameters' (under FSDP2 mixed precision the
        parameters are fp32 masters and the forward runs in bf16/fp16). ``head_precision``: how a half-precision
        model's LM head computes the logits it samples from (``sampling_head``): ``"model"`` in its own dtype where
        the device has that matmul (the default, as vLLM and SGLang do), ``"fp32"`` as fp32 products. ``compile``:
        the decoder layers run ``torch.compile``d in the engine's forwards (``compiled_layers``; CUDA graphs on
        CUDA), falling back to the model's own code with a warning if that fails."""
        if int(draw_memory_bytes) != draw_memory_bytes or draw_memory_bytes < 1:
            raise ValueError(f"draw_memory_bytes must be a positive number of bytes, got {draw_memory_bytes!r}")
        self.draw_memory_bytes = int(draw_memory_bytes)
        self.model = model
        self.tokenizer = tokenizer
        self.truncate_prompts = truncate_prompts
        self.stop_strings = tuple(stop_strings)
        layers, kv_heads, head_dim = kv_shape(model.config)
        device = next(model.parameters()).device
        if pool_tokens is None and memory_bytes is None:
            pool_tokens = 1 << 16
        self.pool = KVPool(
            layers,
            kv_heads,
            head_dim,
            kv_dtype or next(model.parameters()).dtype,
            device,
            page_size=1,
            num_pages=pool_tokens,
            memory_bytes=memory_bytes if pool_tokens is None else None,
        )
        self.cache = RadixCache(self.pool)
        self.runner = ModelRunner(model, self.pool, head_precision, compile)
        self.pad_decode_steps = compile  # decode steps padded to shape buckets (decode_bucket): a few shapes a run
        if compile:
            self.pool.reserve_scratch_slot()
        self.eos = set() if ignore_eos else set(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer)
        self._eos_ids = np.array(sorted(self.eos), dtype=np.int64)
        self.blocks = BlockManager(self.pool, self.cache)
        self.staging = HostStaging(device)
        self.profile = False  # when True, every step appends to step_records (model time synchronised on CUDA)
        self.step_records: list[dict] = []
        self._model_seconds = 0.0
        self.share_prefixes = share_prefixes
        self.cascade = cascade
        self.weights = WeightsWatch(model)
        self.weights.changed()  # the weights the cache starts with

    def on_weights_updated(self) -> None:
        """Announce new weights (``follow_optimizer`` does it after every step of an optimizer): K/V computed with
        the old weights is never reused. A change nobody announces is still found before the next rollout."""
        self.cache.bump_version()
        self.runner.head.forget_weights()
        self.weights.forget()

    def follow_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Retire the cached K/V after every step of ``optimizer`` (fused steps included, which bump no version)."""
        self.weights.follow(optimizer, self.on_weights_updated)

    def _forget_stale_kv(self) -> None:
        """Weights changed since the last rollout, announced or not (``WeightsWatch``): the cached K/V retires."""
        if self.weights.changed():
            self.cache.bump_version()
            self.runner.head.forget_weights()

    # ---- public ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        spec: TreeSpec,
        infos: Sequence[dict] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Tree]:
        """One tree per prompt. With ``seeds`` every tree draws from its own counter-based stream (same seed, same
        tree, whatever else is in the batch); without, from torch's global RNG."""
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        prompts = check_prompt_lengths(prompts, spec, max_positions, self.truncate_prompts)
        infos = infos_for(prompts, infos)
        worst = worst_case_tokens(list(map(len, prompts)), spec.max_generated_tokens, self.pool.capacity_tokens)
        self._forget_stale_kv()
        batch = _Batch(
            prompts,
            spec,
            SamplingParams(spec.temperature, spec.top_p),
            None if seeds is None else root_seeds([int(s) for s in seeds]),
            Scheduler(self.blocks, worst),
        )
        self.blocks.start(max(map(len, prompts), default=0) + (spec.depth - 1) * spec.segment_tokens)
        was_training = self.model.training
        self.model.eval()
        try:
            self._run(batch)
        finally:
            self.model.train(was_training)
        return batch.records.build_trees(prompts, infos)

    # ---- the loop ----------------------------------------------------------------------------------
    def _run(self, batch: "_Batch") -> None:
        try:
            while not batch.scheduler.done:
                admitted = batch.scheduler.admit()
                if admitted:
                    self._timed("prefill", batch, lambda: self._prefill(batch, admitted))
                if len(batch.live):
                    self._timed("decode", batch, lambda: self._decode(batch))
                batch.scheduler.set_live(batch.live.tree)
                batch.scheduler.release_finished()
        except BaseException:  # a forward that raised, non-finite logits, Ctrl-C: give back every slot and lock
            batch.scheduler.abandon()
            raise

    def _timed(self, kind: str, batch: "_Batch", step) -> None:
        if not self.profile:
            return step()
        start, self._model_seconds = time.perf_counter(), 0.0
        step()
        self.step_records.append(
            {
                "kind": kind,
                "branches": len(batch.live),
                "model_s": self._model_seconds,
                "step_s": time.perf_counter() - start,
                "forked": kind == "decode" and batch.forked,
            }
        )

    def _forward(self, inputs) -> torch.Tensor:
        """The final hidden states at the forward's last rows (``ModelRunner.run``)."""
        return self._model_call(self.runner.run, inputs)

    def _model_call(self, fn, *args) -> torch.Tensor:
        """``fn(*args)``; when profiling, its seconds count as the step's model time (synchronised on CUDA)."""
        if not self.profile:
            return fn(*args)
        start = time.perf_counter()
        out = fn(*args)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self._model_seconds += time.perf_counter() - start
        return out

    # ---- prefill -----------------------------------------------------------------------------------
    def _prefill(self, batch: "_Batch", admitted: list[int]) -> None:
        """Prompts of newly admitted trees: identical prompts prefilled once (and matched in the radix cache),
        then every tree's first-level branches forked from its prompt's last logits."""
        groups: dict[tuple, list[int]] = {}
        for t in admitted:
            groups.setdefault(tuple(batch.prompts[t]) if self.share_prefixes else (t,), []).append(t)
        keys = list(groups)
        prompts = [tuple(batch.prompts[groups[k][0]]) for k in keys]
        cached = [
            self.cache.match_prefix(list(p[:-1]))[0] if self.share_prefixes else torch.zeros(0, dtype=torch.long)
            for p in prompts
        ]
        new = [p[len(c) :] for p, c in zip(prompts, cached, strict=True)]
        slots = self.pool.alloc(sum(map(len, new)))
        news = torch.split(slots, [len(n) for n in new])
        try:
            hidden = self._forward(
                sequence_inputs(
                    self.pool, list(zip(cached, news, strict=True)), new, self.runner.device, staging=self.staging
                )
            )
        except BaseException:  # nobody owns the new slots yet
            self.pool.decref(slots)
            raise
        trees, paths = [], []
        for key, prompt, c, n in zip(keys, prompts, cached, news, strict=True):
            if self.share_prefixes:  # every new slot in the cache first: a failing fork leaks none
                already = self.cache.insert(list(prompt), torch.cat([c, n]))
                duplicate = n[: max(0, already - len(c))]
                if len(duplicate):
                    self.pool.decref(duplicate)
                paths.append(self.blocks.hold_cached_prompt(groups[key], prompt))
            else:
                paths.append(self.blocks.hold_own_prompt(groups[key][0], n))
            trees.append(groups[key])
        batch.scheduler.count_used(np.array(admitted), [len(batch.prompts[t]) for t in admitted])
        tree_ids = np.concatenate([np.asarray(g, dtype=np.int64) for g in trees])
        group_rows = np.repeat(np.arange(len(trees)), [len(g) for g in trees])
        parents = roots(
            tree_ids,
            np.asarray(paths, dtype=np.int64)[group_rows],
            batch.seeds[tree_ids] if batch.seeds is not None else np.zeros(len(tree_ids), np.uint64),
        )
        everyone = np.ones(len(parents), dtype=bool)
        _, tokens, logprobs = self._draw_step(batch, parents, hidden, group_rows, forced=everyone, may_fork=everyone)
        born = self._children(batch, parents, np.full(len(parents), ROOT), parents.path, tokens, logprobs)
        batch.live = Branches.concat([batch.live, self._end_finished(batch, born)])

    # ---- decode ------------------------------------------------------------------------------------
    def _decode(self, batch: "_Batch") -> None:
        """Feed every live branch its last token; branches whose segment is full fork, the others draw on."""
        live, spec = batch.live, batch.spec
        slots = self.blocks.alloc_for(live.tree)
        live.own_slots[np.arange(len(live)), live.n - 1] = slots
        batch.scheduler.count_used(live.tree)
        cascade = self.cascade and self.runner.cascade_spares_enough(repeated_path_keys(live, self.blocks.paths))
        pad_to = decode_bucket(len(live)) if self.pad_decode_steps else None
        hidden = self._forward(decode_inputs(live, self.blocks.paths, self.pool, self.staging, cascade, pad_to))
        forced = live.n == spec.segment_tokens  # only below the last level: full last-level segments ended earlier
        may_fork = forced | (
            (live.depth < spec.depth) & (live.n >= spec.min_segment_tokens) if spec.fork_entropy is not None else forced
        )
        fork, tokens, logprobs = self._draw_step(batch, live, hidden, None, forced, may_fork)
        batch.forked = bool(fork.any())
        fork_rows, cont_rows = np.flatnonzero(fork), np.flatnonzero(~fork)
        parents = live.take(fork_rows)
        records = batch.records.add(parents, np.zeros(len(fork_rows), dtype=bool))
        paths = self.blocks.paths.extended(parents.path, parents.own_slots, parents.n)
        continuing = live.take(cont_rows)
        continuing.append(tokens[cont_rows, 0], logprobs[cont_rows, 0])
        born = self._children(batch, parents, records, paths, tokens[fork_rows], logprobs[fork_rows])
        batch.live = self._end_finished(batch, Branches.concat([continuing, born]))

    def _children(self, batch: "_Batch", parents: Branches, records, paths, tokens, logprobs) -> Branches:
        """Children of the forking ``parents`` (one level at a time: levels, not branches), child j's first token in
        column 1 + j of ``tokens``."""
        born = [Branches.empty(batch.spec.segment_tokens)]
        for depth in np.unique(parents.depth):
            at = np.flatnonzero(parents.depth == depth)
            born.append(
                children_of(parents.take(at), records[at], paths[at], batch.spec, tokens[at, 1:], logprobs[at, 1:])
            )
        return Branches.concat(born)

    def _draw_step(
        self,
        batch: "_Batch",
        branches: Branches,
        hidden: torch.Tensor,
        hidden_rows: np.ndarray | None,
        forced: np.ndarray,
        may_fork: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All of a step's draws in one batched call: column 0 a branch's next token (if it may go on), columns
        1..k the first tokens of its k children (if it may fork). Returns which branches fork (``forced``, or
        ``may_fork`` with next-token entropy >= spec.fork_entropy) and the tokens and log-probs [B, 1 + k]."""
        spec, params = batch.spec, batch.params
        k = np.where(may_fork, np.asarray(spec.branching + (0,), dtype=np.int64)[branches.depth], 0)
        width = 1 + int(k.max(initial=0))
        u = None
        if params.temperature == 0:
            u = np.zeros((len(branches), width))
        elif batch.seeds is not None:
            u = np.zeros((len(branches), width))
            u[:, 0] = np.where(forced, 0.0, uniforms(branches.seed, branches.n))
            j = np.arange(1, width)[None, :]
            u[:, 1:] = np.where(j <= k[:, None], uniforms(child_seeds(branches.seed[:, None], j - 1), 0), 0.0)
        entropy = spec.fork_entropy is not None and bool((may_fork & ~forced).any())
        head = _TimedHead(self) if self.profile else self.runner.head
        tokens, logprobs, entropies = draw_step(
            head, hidden, hidden_rows, u, width, params, entropy, self.draw_memory_bytes
        )
        fork = forced | (may_fork & (entropies >= spec.fork_entropy)) if entropy else forced
        return fork, tokens, logprobs

    def _end_finished(self, batch: "_Batch", live: Branches) -> Branches:
        """Branches that sampled EOS or a stop string (finished), or filled a last-level segment, become nodes."""
        spec = batch.spec
        last = live.last_tokens()
        eos = np.isin(last, self._eos_ids) | self._hit_stop_strings(live)
        full = (live.n == spec.segment_tokens) & (live.depth == spec.depth)
        ending = eos | full
        if ending.any():
            batch.records.add(live.take(np.flatnonzero(ending)), eos[ending])
            live = live.take(np.flatnonzero(~ending))
        return live

    def _hit_stop_strings(self, live: Branches) -> np.ndarray:
        if not self.stop_strings:
            return np.zeros(len(live), dtype=bool)
        tails = (self.tokenizer.decode(live.tokens[b, max(0, n - 8) : n].tolist()) for b, n in enumerate(live.n))
        return np.fromiter((any(t.endswith(s) for s in self.stop_strings) for t in tails), dtype=bool, count=len(live))


class _TimedHead:
    """The runner's LM head, its calls counted in the profiled step's model seconds (synchronised on CUDA)."""

    def __init__(self, sampler: TreeSampler):
        self.sampler, self.head = sampler, sampler.runner.head
        self.weight = self.head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.sampler._model_call(self.head.logits, hidden)


class _Batch:
    """One ``sample`` call's state: its trees' live branches, completed nodes and scheduling."""

    def __init__(self, prompts, spec: TreeSpec, params: SamplingParams, seeds, scheduler: Scheduler):
        self.prompts, self.spec, self.params, self.seeds, self.scheduler = prompts, spec, params, seeds, scheduler
        self.live = Branches.empty(spec.segment_tokens)
        self.records = NodeRecords()
        self.forked = False
