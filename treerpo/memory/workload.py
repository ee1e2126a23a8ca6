"""The worst-case training micro-batch a plan budgets for: whole trees of the configured shape, every prompt at
``max_prompt_tokens``, every segment full, every group kept, as many trees as fit ``micro_batch_tokens`` (one when
a tree alone is larger, as the trainer packs it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from treerpo.tree import Tree, TreeSpec


def full_tree(spec: TreeSpec, prompt_tokens: int, rng: np.random.Generator, vocab: int) -> Tree:
    """Every node expanded, every segment ``segment_tokens`` long, every group kept with a nonzero advantage."""
    parents, frontier = [], [0]
    for width in spec.branching:
        children = []
        for parent in frontier:
            for _ in range(width):
                parents.append(parent)
                children.append(len(parents))
        frontier = children
    low = min(3, vocab - 1)
    prompt = rng.integers(low, vocab, size=prompt_tokens)
    segments = [rng.integers(low, vocab, size=spec.segment_tokens) for _ in parents]
    tree = Tree.from_segments(prompt, parents, segments, finished=[False] * len(parents))
    tree.kept = np.ones(tree.num_nodes, dtype=bool)
    tree.kept[0] = False
    tree.advantage = rng.choice([-1.0, 1.0], size=tree.num_nodes)
    return tree


def worst_case_micro_batch(
    spec: TreeSpec, micro_batch_tokens: int, vocab: int, seed: int = 0, max_trees: int | None = None
) -> list[Tree]:
    """As many full trees as fit ``micro_batch_tokens`` (at least one), at most ``max_trees`` (a rank's share of a
    minibatch)."""
    rng = np.random.default_rng(seed)
    first = full_tree(spec, spec.max_prompt_tokens, rng, vocab)
    count = max(1, micro_batch_tokens // first.num_tokens)
    count = min(count, max_trees) if max_trees else count
    return [first] + [full_tree(spec, spec.max_prompt_tokens, rng, vocab) for _ in range(count - 1)]


@dataclass(frozen=True)
class PackedShape:
    """What the activation estimate reads off the packed micro-batch."""

    tokens: int
    loss_rows: int
    path_chunks: int  # the paths backend's query chunks (runs of <= chunk tokens, each the child of the last)
    chunk: int
    longest_path: int  # its padded key length: the longest ancestor path of a chunk's last token
    tree_tokens: tuple[int, ...]  # tokens of each tree (the sdpa backend's dense mask is per tree)


def packed_shape(trees: list[Tree]) -> PackedShape:
    from treerpo.attention.paths_backend import DEFAULT_CHUNK, build_path_chunks
    from treerpo.trees.packing import pack_trees

    packed = pack_trees(trees, prune_unkept=True)
    chunks = build_path_chunks(packed.tin, packed.tout, DEFAULT_CHUNK)
    return PackedShape(
        tokens=packed.num_tokens,
        loss_rows=int(packed.loss_mask.sum()),
        path_chunks=int(chunks.query_index.shape[0]),
        chunk=int(chunks.query_index.shape[1]),
        longest_path=int(chunks.key_index.shape[1]),
        tree_tokens=tuple(int(t.num_tokens) for t in trees),
    )
