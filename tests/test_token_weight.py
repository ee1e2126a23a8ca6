"""token_weight: how a segment shared by several answers counts in the loss, against per-path forwards."""

import numpy as np
import pytest
import torch

from helpers import assert_close_normwise
from treerpo.config import ConfigError, make_config
from treerpo.training.trainer import Trainer
from treerpo.tree import Tree
from treerpo.trees.packing import pack_trees
from treerpo.trees.token_weights import loss_token_count, loss_weight, node_token_weights, row_weights

# root -> a (3 tokens), b (2); a -> c (1), d (2), e (4); b is a leaf
PARENTS = [0, 0, 1, 1, 1]
SEGMENTS = [[5, 6, 7], [8, 9], [10], [11, 12], [13, 14, 15, 16]]


def hand_tree(kept=(False, True, True, True, True, True)):
    tree = Tree.from_segments([3, 4], PARENTS, SEGMENTS, finished=[False, True, True, True, True])
    tree.kept = np.array(kept)
    tree.advantage = np.array([0.0, 0.7, -0.7, 1.2, -0.4, -0.8])
    return tree


def test_leaves_below_and_loss_weights_by_hand():
    tree = hand_tree()
    assert tree.leaves_below().tolist() == [4, 3, 1, 1, 1, 1]
    assert node_token_weights(tree, "node").tolist() == [1] * 6
    assert loss_token_count(tree) == loss_weight(tree, "node") == 3 + 2 + 1 + 2 + 4
    # answers: a+c (4 tokens), a+d (5), a+e (7), b (2): a's 3 tokens are in three answers
    assert loss_weight(tree, "leaves") == 4 + 5 + 7 + 2
    b_dropped = hand_tree(kept=(False, True, False, True, True, True))
    assert loss_weight(b_dropped, "leaves") == 3 * 3 + 1 + 2 + 4
    with pytest.raises(ValueError, match="token_weight"):
        node_token_weights(tree, "answers")


def test_row_weights_follow_the_packed_rows():
    trees = [hand_tree(), Tree.from_segments([3], [0, 1], [[5], [6, 7]], finished=[False, True])]
    trees[1].kept, trees[1].advantage = np.array([False, True, True]), np.zeros(3)
    packed = pack_trees(trees, prune_unkept=True)
    rows = packed.loss_mask.nonzero().squeeze(1)
    got = row_weights(trees, packed.tree_index[rows].numpy(), packed.node_index[rows].numpy(), "leaves")
    expected = [
        trees[t].leaves_below()[n]
        for t, n in zip(packed.tree_index[rows].tolist(), packed.node_index[rows].tolist(), strict=True)
    ]
    assert got.tolist() == expected
    assert got.sum() == sum(loss_weight(t, "leaves") for t in trees)


def test_unknown_token_weight_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="token_weight='answers' is not valid; choose one of"):
        make_config({"token_weight": "answers"})


def _reference_loss(model, trees, token_weight):
    """On-policy PPO without KL, each answer or node forwarded alone through the model's own causal attention: the
    loss of ``node`` sums every kept node's segment once, that of ``leaves`` every kept segment once per answer
    (root-to-leaf path) containing it. Returns the token-weighted mean of -advantage (the loss's value: the ratio
    is 1) and of -advantage x log-prob (a surrogate with the loss's gradient)."""
    total, value, count = 0.0, 0.0, 0
    for tree in trees:
        ends = tree.leaves() if token_weight == "leaves" else range(1, tree.num_nodes)
        for end in ends:
            path = tree.path(end)
            ids = torch.as_tensor(tree.path_token_ids(end))[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            logp = logp.gather(1, ids[0, 1:, None]).squeeze(1)
            start = len(tree.prompt_ids)
            for node in path[1:]:
                n = len(tree.segment(node))
                if tree.kept[node] and (token_weight == "leaves" or node == end):
                    total = total - tree.advantage[node] * logp[start - 1 : start - 1 + n].sum()
                    value -= tree.advantage[node] * n
                    count += n
                start += n
    return value / count, total / count


@pytest.mark.parametrize("token_weight", ["node", "leaves"])
def test_trainer_loss_and_gradient_equal_per_path_forwards(tmp_path, token_weight):
    config = make_config(
        dict(
            prompts_per_step=2,
            branching=[2, 2],
            segment_tokens=4,
            eval_size=4,
            eval_every=0,
            save_every=0,
            threads=1,
            kl_coef=0.0,
            max_grad_norm=1e9,
            token_weight=token_weight,
            output_dir=str(tmp_path),
        )
    )
    trainer = Trainer(config, log=lambda *a: None)
    try:
        rng = np.random.default_rng(0)
        trees = [hand_tree(), hand_tree(kept=(False, True, False, True, True, True))]
        for tree in trees:
            tree.token_ids = rng.integers(3, 20, size=tree.num_tokens)
            tree.advantage = rng.normal(size=tree.num_nodes)
        captured = {}

        def capture_instead_of_step():
            captured.update(
                {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
            )

        trainer.optimizer.step = capture_instead_of_step
        stats = trainer.update(trees)

        trainer.model.zero_grad(set_to_none=True)
        value, surrogate = _reference_loss(trainer.model, trees, token_weight)
        surrogate.backward()
        assert stats["loss"] == pytest.approx(value, rel=1e-5, abs=1e-6)
        assert stats["tokens_trained"] == sum(loss_token_count(t) for t in trees)
        assert captured
        for name, param in trainer.model.named_parameters():
            assert_close_normwise(captured[name], param.grad, rel=1e-5, msg=name)
    finally:
        trainer.close()


def test_the_two_weightings_differ_where_segments_are_shared():
    """Not a tautology: the hand tree's shared segment a (3 answers) weighs 3x under ``leaves``."""
    tree = hand_tree()
    lengths = np.diff(tree.offsets)
    shares = {w: node_token_weights(tree, w) * lengths / loss_weight(tree, w) for w in ("node", "leaves")}
    assert shares["leaves"][1] == pytest.approx(9 / 18)
    assert shares["node"][1] == pytest.approx(3 / 12)
