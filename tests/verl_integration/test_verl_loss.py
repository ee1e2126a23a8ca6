"""Exactness: the policy-gradient loss verl computes on the samples of a batch of trees, with the advantages the
treerpo trainer gives it, equals treerpo's packed loss on the same trees (fp32, within 1e-5).

Each tree's leaves are verl samples (the path's tokens); new and old log-probs are drawn per tree token and read by
every leaf through that token, as a model would give them (a token's context is its path). verl's side is its own
``compute_policy_loss_vanilla`` with ``token-mean`` over the batch's response tokens; treerpo's is ``policy_loss`` over
each distinct token of the trees once, weighted by ``kept`` and divided by the loss-token count."""

import numpy as np
import pytest
import torch

from helpers import random_tree
from treerpo.algorithms.loss import policy_loss
from treerpo.integrations.verl.advantages import leaf_fields, sample_advantages, verl_token_mean_scale
from treerpo.tree import Tree

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")


class _ActorConfig(dict):
    """What ``compute_policy_loss_vanilla`` reads of verl's ActorConfig."""

    def __init__(self, tokens: int, clip: float):
        super().__init__(clip_ratio_c=3.0)
        self.clip_ratio = self.clip_ratio_low = self.clip_ratio_high = clip
        self.global_batch_info = {"dp_size": 1, "batch_num_tokens": tokens, "global_batch_size": None}


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    trees: list[Tree] = [random_tree(rng, 8), random_tree(rng, 6, shape="fan"), random_tree(rng, 5)]
    for tree in trees:
        for leaf in tree.leaves():
            tree.reward[leaf] = float(rng.integers(0, 2))
    # per tree token: the old log-prob and the current one (ratios within and beyond the clip range)
    old = [torch.tensor(rng.normal(-2.0, 0.5, tree.num_tokens), dtype=torch.float32) for tree in trees]
    new = [o + torch.tensor(rng.normal(0.0, 0.3, len(o)), dtype=torch.float32) for o in old]
    return trees, old, new


def _leaf_tokens(tree: Tree, leaf: int) -> np.ndarray:
    return np.concatenate([np.arange(tree.offsets[n], tree.offsets[n + 1]) for n in tree.path(leaf)[1:]])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_verl_loss_equals_treerpo_packed_loss(seed):
    trees, old, new = _batch(seed)
    samples, rewards, token_index, tree_of = [], [], [], []
    for t, tree in enumerate(trees):
        for leaf in tree.leaves():
            if leaf == 0:
                continue
            samples.append(leaf_fields(tree, int(leaf), key=f"t{t}"))
            rewards.append(tree.reward[leaf])
            token_index.append(_leaf_tokens(tree, int(leaf)))
            tree_of.append(t)
    result = sample_advantages(samples, rewards)
    # verl's side: [samples, width] right-padded, the trainer's scaled advantages
    width = max(len(ix) for ix in token_index)
    mask = torch.zeros(len(samples), width)
    adv, lp_old, lp_new = torch.zeros_like(mask), torch.zeros_like(mask), torch.zeros_like(mask)
    for i, ix in enumerate(token_index):
        mask[i, : len(ix)] = 1
        lp_old[i, : len(ix)] = old[tree_of[i]][ix]
        lp_new[i, : len(ix)] = new[tree_of[i]][ix]
    tokens = int(mask.sum())
    scale = verl_token_mean_scale(tokens, result.loss_tokens)
    for i, a in enumerate(result.advantages):
        adv[i, : len(a)] = torch.as_tensor(a * scale, dtype=torch.float32)
    verl_loss, _ = core_algos.compute_policy_loss_vanilla(
        lp_old, lp_new, adv, mask, loss_agg_mode="token-mean", config=_ActorConfig(tokens, clip=0.2)
    )
    # treerpo's side: every generated tree token once, its node's advantage, weight = kept
    rebuilt = result.trees
    packed_adv, packed_w, packed_old, packed_new = [], [], [], []
    for t, tree in enumerate(rebuilt):
        for n in range(1, tree.num_nodes):
            span = slice(tree.offsets[n], tree.offsets[n + 1])
            count = tree.offsets[n + 1] - tree.offsets[n]
            packed_adv.append(torch.full((count,), float(tree.advantage[n])))
            packed_w.append(torch.full((count,), float(tree.kept[n])))
            packed_old.append(old[t][span])
            packed_new.append(new[t][span])
    treerpo_loss, _ = policy_loss(
        torch.cat(packed_new),
        torch.cat(packed_old),
        torch.cat(packed_adv).float(),
        weights=torch.cat(packed_w),
        clip_low=0.2,
        clip_high=0.2,
        normalizer=result.loss_tokens,
    )
    assert abs(float(verl_loss)) > 1e-4, "the case should have a loss to compare"
    assert abs(float(verl_loss) - float(treerpo_loss)) <= 1e-5 * max(1.0, abs(float(treerpo_loss)))
