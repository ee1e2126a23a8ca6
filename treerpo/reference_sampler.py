"""The reference tree sampler: level by level, each child continues its parent's token path with ``generate``.

Simple and correct; the oracle for the radix-cache engine and the "independent sampling"
baseline (every branch re-reads its whole path).
"""
from __future__ import annotations

from typing import Sequence

from .generation import continue_sequences
from .tree import Tree, TreeSpec


class PromptTooLongError(ValueError):
    pass


def check_prompt_lengths(prompts: Sequence[Sequence[int]], spec: TreeSpec, max_positions: int | None,
                         truncate: bool = False) -> list[list[int]]:
    """Refuse (or, with ``truncate``, keep the last ``max_prompt_tokens`` of) prompts that do not fit.

    A prompt fits when it has at most ``spec.max_prompt_tokens`` tokens and prompt plus the
    longest completion stays within the model's ``max_positions``.
    """
    limit = spec.max_prompt_tokens
    if max_positions is not None:
        limit = min(limit, max_positions - spec.max_new_tokens)
        if limit < 1:
            raise PromptTooLongError(
                f"the tree's longest completion ({spec.depth} x {spec.segment_tokens} tokens) leaves no room for a "
                f"prompt in the model's context of {max_positions} positions; lower depth or segment_tokens")
    out = []
    for i, ids in enumerate(prompts):
        if len(ids) > limit:
            if not truncate:
                raise PromptTooLongError(
                    f"prompt {i} has {len(ids)} tokens but at most {limit} fit (max_prompt_tokens="
                    f"{spec.max_prompt_tokens}, context {max_positions}, completion up to {spec.max_new_tokens}); "
                    "shorten it, raise max_prompt_tokens, or set truncate_prompts to keep its last tokens")
            ids = ids[-limit:]
        out.append(list(ids))
    return out


class ReferenceTreeSampler:
    def __init__(self, model, tokenizer, batch_size: int = 256, truncate_prompts: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.truncate_prompts = truncate_prompts

    def sample(self, prompts: Sequence[Sequence[int]], spec: TreeSpec, infos: Sequence[dict] | None = None,
               ) -> list[Tree]:
        """One tree per prompt (token ids). Uses the torch RNG: seed it for a reproducible tree."""
        if spec.fork_entropy is not None:
            raise ValueError("entropy-triggered forks (fork_entropy) are implemented by the engine sampler only; use "
                             "TreeSampler (--sampler engine) or leave fork_entropy unset")
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        prompts = check_prompt_lengths(prompts, spec, max_positions, self.truncate_prompts)
        # per tree: lists of parents, segments, finished flags (node 0 = prompt)
        nodes = [{"parents": [], "segments": [], "finished": []} for _ in prompts]
        paths = {(t, 0): list(p) for t, p in enumerate(prompts)}  # open frontier: (tree, node) -> token path
        was_training = self.model.training
        self.model.eval()
        for branching in spec.branching:
            requests = [(key, child) for key in paths for child in range(branching)]
            if not requests:
                break
            outputs = continue_sequences(self.model, self.tokenizer, [paths[key] for key, _ in requests],
                                         spec.segment_tokens, spec.temperature, spec.top_p, self.batch_size)
            next_paths = {}
            for ((t, parent), _), (tokens, ended) in zip(requests, outputs):
                record = nodes[t]
                record["parents"].append(parent)
                record["segments"].append(tokens)
                record["finished"].append(ended)
                if not ended:
                    next_paths[(t, len(record["parents"]))] = paths[(t, parent)] + tokens
            paths = next_paths
        self.model.train(was_training)
        infos = infos or [{} for _ in prompts]
        return [Tree.from_segments(p, r["parents"], r["segments"], r["finished"], info)
                for p, r, info in zip(prompts, nodes, infos)]
