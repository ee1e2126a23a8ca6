"""Which trees each optimizer step trains on, decided over the whole step's batch whatever the number of ranks.

Trees are numbered globally (rank r holds a contiguous range). Every rank draws the same permutation of the
trainable trees and splits it into the same minibatches, so an optimizer step covers the trees one process
would train on; each rank cuts its own members of a minibatch into micro-batches. The loss normalizer is the
minibatch's global count of loss tokens. Under DDP or FSDP2 every forward and backward can be a collective, so
each rank pads its micro-batch list to the longest rank's with ``filler_tree`` batches whose loss is multiplied
by zero: a rank with less (or no) work issues the same collectives as the others instead of deadlocking them.
"""

from __future__ import annotations

import numpy as np

from treerpo.tree import Tree


def minibatch_indices(loss_tokens: list[int], minibatches: int) -> list[list[int]]:
    """Global indices of the trainable trees (those with loss tokens) in random order (NumPy's global RNG, equal on
    every rank), split into ``minibatches`` groups (fewer only when fewer trees are trainable)."""
    trainable = [i for i, count in enumerate(loss_tokens) if count > 0]
    if not trainable:
        return []
    order = np.random.permutation(len(trainable))
    return [[trainable[j] for j in chunk] for chunk in np.array_split(order, min(minibatches, len(trainable)))]


def micro_batches(trees: list[Tree], token_budget: int) -> list[list[Tree]]:
    """Consecutive groups of trees of at most ``token_budget`` tokens (a bigger tree goes alone)."""
    groups, current, size = [], [], 0
    for tree in trees:
        if current and size + tree.num_tokens > token_budget:
            groups.append(current)
            current, size = [], 0
        current.append(tree)
        size += tree.num_tokens
    return groups + ([current] if current else [])


def filler_tree(token_id: int) -> Tree:
    """The smallest trainable tree (a one-token prompt, one kept one-token child): a padding micro-batch's input,
    its loss multiplied by zero."""
    tree = Tree.from_segments([token_id], [0], [[token_id]], [True])
    tree.kept = np.array([False, True])
    tree.advantage = np.zeros(2)
    return tree
