"""The reference tree sampler: level by level, each child continues its parent's token path with ``generate``.

Simple and correct: the tests' reference for the engine (``treerpo.engine``), and the "independent sampling"
baseline (every branch re-reads its whole path).
"""

from __future__ import annotations

from typing import Sequence

from treerpo.sampling.generation import continue_sequences
from treerpo.sampling.prompt_rules import check_prompt_lengths, infos_for
from treerpo.tree import Tree, TreeSpec


class ReferenceTreeSampler:
    def __init__(self, model, tokenizer, batch_size: int = 256, truncate_prompts: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.truncate_prompts = truncate_prompts

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        spec: TreeSpec,
        infos: Sequence[dict] | None = None,
    ) -> list[Tree]:
        """One tree per prompt (token ids). Uses the torch RNG: seed it for a reproducible tree."""
        if spec.fork_entropy is not None:
            raise ValueError(
                "entropy-triggered forks (fork_entropy) are implemented by the engine sampler only; use "
                "TreeSampler (--sampler engine) or leave fork_entropy unset"
            )
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        prompts = check_prompt_lengths(prompts, spec, max_positions, self.truncate_prompts)
        infos = infos_for(prompts, infos)
        # per tree: lists of parents, segments, finished flags (node 0 = prompt)
        nodes = [{"parents": [], "segments": [], "finished": []} for _ in prompts]
        paths = {(t, 0): list(p) for t, p in enumerate(prompts)}  # open frontier: (tree, node) -> token path
        was_training = self.model.training
        self.model.eval()
        for branching in spec.branching:
            requests = [(key, child) for key in paths for child in range(branching)]
            if not requests:
                break
            outputs = continue_sequences(
                self.model,
                self.tokenizer,
                [paths[key] for key, _ in requests],
                spec.segment_tokens,
                spec.temperature,
                spec.top_p,
                self.batch_size,
            )
            next_paths = {}
            for ((t, parent), _), (tokens, ended) in zip(requests, outputs, strict=True):
                record = nodes[t]
                record["parents"].append(parent)
                record["segments"].append(tokens)
                record["finished"].append(ended)
                if not ended:
                    next_paths[(t, len(record["parents"]))] = paths[(t, parent)] + tokens
            paths = next_paths
        self.model.train(was_training)
        return [
            Tree.from_segments(p, r["parents"], r["segments"], r["finished"], info)
            for p, r, info in zip(prompts, nodes, infos, strict=True)
        ]
