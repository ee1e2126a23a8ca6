"""Packed-tree log-probs (one tree-masked forward) equal per-path log-probs of the plain model."""

import numpy as np
import pytest
import torch

from helpers import assert_close_normwise, dense_visibility, random_tree, tiny_model
from treerpo.policy.logprobs import packed_logprobs
from treerpo.trees.packing import pack_trees


def per_path_logprobs(model, tree, node):
    """Log-probs of every token of node's root-to-node path (but the first) from a plain causal forward."""
    path = torch.as_tensor(tree.path_token_ids(node))
    logits = model(input_ids=path[None]).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, path[1:, None]).squeeze(1)


def reference(model, trees, batch, rows):
    """Row r is token number position_ids[r] of its path, predicted by the path's previous token."""
    out = []
    for r in rows.tolist():
        tree = trees[int(batch.tree_index[r])]
        out.append(per_path_logprobs(model, tree, int(batch.node_index[r]))[int(batch.position_ids[r]) - 1])
    return torch.stack(out)


CASES = {
    "single_node": [dict(num_nodes=1)],
    "deep_chain": [dict(num_nodes=12, shape="chain")],
    "wide_fanout": [dict(num_nodes=16, shape="fan")],
    "one_token_segments": [dict(num_nodes=10, max_segment=1)],  # early EOS: children of length 1
    "several_trees": [dict(num_nodes=5), dict(num_nodes=1), dict(num_nodes=9, shape="chain"), dict(num_nodes=7)],
}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_logprobs_match_per_path(case, arch):
    rng = np.random.default_rng(hash(case) % 2**32)
    trees = [random_tree(rng, **kw) for kw in CASES[case]]
    model = tiny_model(arch)
    batch = pack_trees(trees)
    rows = torch.nonzero(batch.prev_index >= 0).squeeze(1)  # every token that has a prediction
    with torch.no_grad():
        packed = packed_logprobs(model, batch, rows=rows, chunk_size=7)
        expected = reference(model, trees, batch, rows)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_gradients_match_per_path(arch):
    rng = np.random.default_rng(7)
    trees = [random_tree(rng, num_nodes=6), random_tree(rng, num_nodes=4, shape="chain")]
    batch = pack_trees(trees)
    weights = torch.as_tensor(rng.normal(size=batch.num_tokens), dtype=torch.float32)
    rows = torch.nonzero(batch.loss_mask).squeeze(1)

    model = tiny_model(arch)
    (packed_logprobs(model, batch, rows=rows, chunk_size=5) * weights[rows]).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    (reference(model, trees, batch, rows) * weights[rows]).sum().backward()
    for name, p in model.named_parameters():
        assert_close_normwise(packed_grads[name], p.grad, rel=1e-4, floor=1e-5, msg=name)


def test_packing_layout_hand_computed():
    from treerpo.tree import Tree

    # prompt [5,6]; node1 = [7] under root; node2 = [8,9] under root; node3 = [10] under node1
    tree = Tree.from_segments([5, 6], [0, 0, 1], [[7], [8, 9], [10]], [False] * 3)
    tree.kept[:] = [False, True, True, True]
    b = pack_trees([tree])
    assert b.input_ids.tolist() == [5, 6, 7, 10, 8, 9]  # depth-first: node1's subtree before node2
    assert b.position_ids.tolist() == [0, 1, 2, 3, 2, 3]
    assert b.prev_index.tolist() == [-1, 0, 1, 2, 1, 4]  # the prompt's last row predicts both children
    assert b.tin.tolist() == [0, 1, 2, 3, 4, 5]
    assert b.tout.tolist() == [6, 6, 4, 4, 6, 6]
    assert b.loss_mask.tolist() == [False, False, True, True, True, True]
    visible = dense_visibility(b)
    assert visible[3].tolist() == [True, True, True, True, False, False]  # token 10 sees prompt, 7, itself
    assert visible[5].tolist() == [True, True, False, False, True, True]


def test_pruning_drops_subtrees_without_loss():
    from treerpo.tree import Tree

    tree = Tree.from_segments([1], [0, 0, 2], [[2], [3], [4]], [False] * 3)
    tree.kept[:] = [False, False, False, True]  # only node 3 (under node 2) trains
    b = pack_trees([tree], prune_unkept=True)
    assert b.input_ids.tolist() == [1, 3, 4]
    assert b.loss_mask.tolist() == [False, False, True]
