"""How much each generated token of a tree counts in the loss (``token_weight``), and the normalizer it gives."""

from __future__ import annotations

import numpy as np

from treerpo.tree import Tree

TOKEN_WEIGHTS = ("node", "leaves")


def loss_token_count(tree: Tree) -> int:
    """Generated tokens of kept nodes: what the loss of this tree sums over."""
    return loss_weight(tree, "node")


def node_token_weights(tree: Tree, token_weight: str) -> np.ndarray:
    """int64 [n]: the loss weight of each token of each node. ``node``: 1, every generated token counted once;
    ``leaves``: the leaves below the node, so a shared segment counts once per answer that contains it (the loss
    of the tree's answers taken one by one, as GRPO weighs them)."""
    if token_weight == "node":
        return np.ones(tree.num_nodes, dtype=np.int64)
    if token_weight == "leaves":
        return tree.leaves_below()
    raise ValueError(f"token_weight={token_weight!r} is not valid; choose one of {list(TOKEN_WEIGHTS)}")


def loss_weight(tree: Tree, token_weight: str) -> int:
    """The tree's share of the loss normalizer: its kept generated tokens, each weighted by ``token_weight``."""
    lengths = np.diff(tree.offsets)[1:]
    kept = tree.kept[1:]
    return int((lengths[kept] * node_token_weights(tree, token_weight)[1:][kept]).sum())


def row_weights(trees: list[Tree], tree_index: np.ndarray, node_index: np.ndarray, token_weight: str) -> np.ndarray:
    """float32 weights of packed rows given as (tree within ``trees``, node) pairs."""
    weights = [node_token_weights(t, token_weight) for t in trees]
    first_node = np.concatenate([[0], np.cumsum([len(w) for w in weights])[:-1]]).astype(np.int64)
    return np.concatenate(weights)[first_node[tree_index] + node_index].astype(np.float32)
