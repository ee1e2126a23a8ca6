"""Trees as the (prompt, completion) rows a completion-based RL trainer expects, with tree credit per token.

Row r is the root-to-leaf path of leaf ``rows[r] = (tree, leaf)``. A token of node n lies on the paths of
every leaf below n, so it appears in ``leaves_below[n]`` rows. ``token_weights`` gives each of its copies
``1 / leaves_below[n]`` (0 for nodes whose sibling group was filtered out), ``token_advantages`` the node's
advantage times that weight. Then any per-token loss summed over the rows with these weights equals the
same loss summed once over the tree's tokens, which is what ``pack_trees`` + ``packed_logprobs`` train on:

    sum_r sum_t weight[r, t] * f(token)  ==  sum over distinct loss tokens of f(token)

and ``loss_tokens`` (the number of distinct loss tokens) is the normaliser of treerpo's token-mean loss.
PPO clipping commutes with the positive weight, so ``-min(ratio * A, clip(ratio) * A)`` with
``A = token_advantages`` is the packed loss too; a KL term needs ``token_weights`` as its own weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from treerpo.tree import Tree
from treerpo.trees.token_weights import loss_token_count


@dataclass
class FlatCompletions:
    rows: list[tuple[int, int]]  # row -> (tree index, leaf node)
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampling_logprobs: list[list[float]] | None  # the sampler's log-prob of each completion token
    token_weights: list[np.ndarray]  # float64 per completion token: kept / leaves below the token's node
    token_advantages: list[np.ndarray]  # float64 per completion token: node advantage * weight
    loss_tokens: int  # distinct generated tokens of kept nodes over all trees

    def __len__(self) -> int:
        return len(self.rows)

    def padded(self, values: list[np.ndarray], width: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """[rows, width] right-padded with 0 (``width`` defaults to the longest completion)."""
        width = max((len(v) for v in values), default=0) if width is None else width
        out = torch.zeros(len(values), width, dtype=dtype)
        for r, v in enumerate(values):
            out[r, : len(v)] = torch.as_tensor(v[:width], dtype=dtype)
        return out


def leaves_below(tree: Tree) -> np.ndarray:
    """Number of leaves in each node's subtree (a leaf counts itself)."""
    count = tree.is_leaf().astype(np.int64)
    for node in range(tree.num_nodes - 1, 0, -1):  # children come after their parent
        count[tree.parent[node]] += count[node]
    return count


def _path_values(tree: Tree, leaf: int, per_node: np.ndarray) -> np.ndarray:
    nodes = tree.path(leaf)[1:]
    return (
        np.concatenate([np.full(tree.offsets[n + 1] - tree.offsets[n], per_node[n]) for n in nodes])
        if nodes
        else np.zeros(0)
    )


def flatten_trees(trees: Sequence[Tree]) -> FlatCompletions:
    """One row per leaf path, in tree order then leaf order (the order of ``scoring.leaf_completions``)."""
    rows, prompts, completions, logprobs, weights, advantages = [], [], [], [], [], []
    for t, tree in enumerate(trees):
        weight_of_node = np.where(tree.kept, 1.0 / np.maximum(leaves_below(tree), 1), 0.0)
        for leaf in tree.leaves():
            if leaf == 0:
                continue
            rows.append((t, int(leaf)))
            prompts.append(tree.prompt_ids.tolist())
            completions.append(tree.path_token_ids(int(leaf), include_prompt=False).tolist())
            if tree.token_logprobs is not None:
                logprobs.append(
                    np.concatenate(
                        [tree.token_logprobs[tree.offsets[n] : tree.offsets[n + 1]] for n in tree.path(int(leaf))[1:]]
                    ).tolist()
                )
            weights.append(_path_values(tree, int(leaf), weight_of_node))
            advantages.append(_path_values(tree, int(leaf), weight_of_node * tree.advantage))
    have_logprobs = all(t.token_logprobs is not None for t in trees)
    return FlatCompletions(
        rows,
        prompts,
        completions,
        logprobs if have_logprobs else None,
        weights,
        advantages,
        sum(loss_token_count(t) for t in trees),
    )
