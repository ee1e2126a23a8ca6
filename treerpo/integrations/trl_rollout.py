"""``rollout_func`` for TRL's GRPOTrainer: its G completions per prompt sampled by treerpo's engine.

TRL repeats each prompt G times in a row; each run of identical prompts becomes one depth-1 tree, so the
prompt is prefilled once for its G completions (and served from the radix cache while the weights are
unchanged). The engine runs on the very model TRL trains: no weight copy, and an optimizer step retires the
cached K/V by itself (the engine follows TRL's optimizer). Each run of identical prompts is seeded from
(seed, step, global index of its first row), so with several processes (DDP) a process's completions do not depend
on how many there are, as long as no run is split between processes.
"""

from __future__ import annotations

from itertools import groupby
from typing import Callable

from treerpo.algorithms.grpo import grpo_spec
from treerpo.engine.kv_pool import RequestTooLarge
from treerpo.integrations.trl_sampling import UnsupportedTRLOption, engine_for, engine_sampling
from treerpo.training.seeding import tree_seed

FEATURE = "treerpo_rollout"


def treerpo_rollout(pool_tokens: int | None = None, memory_bytes: int | None = None) -> Callable:
    """A ``rollout_func`` for ``GRPOTrainer(..., rollout_func=treerpo_rollout())``.

    ``pool_tokens`` / ``memory_bytes`` size the engine's KV pool (default 65,536 tokens); a group whose
    worst case does not fit is refused before any work with the size it needs. Returns TRL's keys
    ``prompt_ids``, ``completion_ids`` (cut after the first EOS, as TRL's own generation does) and
    ``logprobs`` (the sampler's log-prob of each completion token)."""

    def rollout(prompts: list, trainer) -> dict:
        sampling = engine_sampling(trainer, FEATURE)
        prompt_ids, images, _ = trainer._tokenize_prompts(prompts)
        if images is not None:
            raise UnsupportedTRLOption(f"{FEATURE} does not support images: use TRL's own generation")
        sampler = engine_for(trainer, sampling, pool_tokens, memory_bytes)
        completions, logprobs = [None] * len(prompt_ids), [None] * len(prompt_ids)
        groups = _runs_of_identical(prompt_ids)
        for size in sorted({len(g) for g in groups}):  # one engine call per group size: all groups decode together
            same_size = [g for g in groups if len(g) == size]
            spec = grpo_spec(
                size,
                sampling.max_new_tokens,
                max(len(prompt_ids[g[0]]) for g in same_size),
                sampling.temperature,
                sampling.top_p,
            )
            first = trainer.accelerator.process_index * len(prompt_ids)  # processes hold consecutive slices
            seeds = [tree_seed(trainer.args.seed, trainer.state.global_step, first + g[0]) for g in same_size]
            try:
                trees = sampler.sample([list(prompt_ids[g[0]]) for g in same_size], spec, seeds=seeds)
            except RequestTooLarge as error:
                raise RequestTooLarge(f"{error} (here: treerpo_rollout(pool_tokens=...))") from None
            for group, tree in zip(same_size, trees, strict=True):
                for row, leaf in zip(group, tree.children(0), strict=True):
                    completions[row] = tree.segment(int(leaf)).tolist()
                    logprobs[row] = tree.token_logprobs[tree.offsets[leaf] : tree.offsets[leaf + 1]].tolist()
        return {"prompt_ids": [list(p) for p in prompt_ids], "completion_ids": completions, "logprobs": logprobs}

    return rollout


def _runs_of_identical(prompt_ids: list) -> list[list[int]]:
    """Indices of consecutive rows with the same prompt tokens."""
    return [list(rows) for _, rows in groupby(range(len(prompt_ids)), key=lambda i: tuple(prompt_ids[i]))]
