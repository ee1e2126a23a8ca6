"""Per-tree blocks of the sdpa backend equal the brute-force split of the dense mask."""

import numpy as np
import torch

from helpers import random_tree
from treerpo.attention import interval_mask, sdpa_tree_attention, tree_blocks
from treerpo.trees.packing import pack_trees


def test_blocks_are_the_trees():
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, num_nodes=int(n)) for n in (3, 1, 7, 2)]
    b = pack_trees(trees)
    sizes = [t.num_tokens for t in trees]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    assert tree_blocks(b.tin, b.tout) == list(zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True))


def test_blockwise_equals_full_dense_mask():
    rng = np.random.default_rng(1)
    b = pack_trees([random_tree(rng, num_nodes=5) for _ in range(3)])
    n = b.num_tokens
    q, k, v = (torch.randn(1, 4, n, 8) for _ in range(3))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=interval_mask(b.tin, b.tout))
    torch.testing.assert_close(sdpa_tree_attention(q, k, v, b.tin, b.tout), full)
