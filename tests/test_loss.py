"""PPO-clip loss and k3 KL against hand-computed values; a gradient step moves log-probs the right way."""

import math

import numpy as np
import pytest
import torch

from helpers import random_tree, tiny_model
from treerpo.algorithms.loss import policy_loss
from treerpo.policy.logprobs import packed_logprobs
from treerpo.trees.packing import pack_trees


def test_clip_hand_computed():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9]))  # ratios against old = 0
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, -2.0, 2.0])
    loss, stats = policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # per token: -min(r*A, clip(r)*A) -> A>0 caps r at 1.28; A<0 floors r at 0.8
    expected = -np.array([min(1.5, 1.28), min(-0.5, -0.8), min(-2.2, -2.2), min(1.8, 1.8)])
    assert loss.item() == pytest.approx(expected.mean(), rel=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_mask_and_normalizer():
    logp, old, adv = torch.zeros(4), torch.zeros(4), torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([True, False, True, False])
    loss, _ = policy_loss(logp, old, adv, weights=mask)
    assert loss.item() == pytest.approx(-(1 + 3) / 2)
    loss, _ = policy_loss(logp, old, adv, weights=mask, normalizer=8)  # token mean over a larger batch
    assert loss.item() == pytest.approx(-(1 + 3) / 8)


def test_k3_kl_hand_computed():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(2), ref_logprobs=ref, kl_coef=0.5)
    k3 = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]
    assert stats["kl"] == pytest.approx(np.mean(k3))
    assert loss.item() == pytest.approx(0.5 * np.mean(k3))


def test_gradient_step_raises_positive_advantage_tokens():
    rng = np.random.default_rng(3)
    trees = [random_tree(rng, num_nodes=6) for _ in range(3)]
    for t in trees:
        t.kept[1:] = True
    batch = pack_trees(trees)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rows = torch.nonzero(batch.loss_mask).squeeze(1)
    before = packed_logprobs(model, batch, rows)
    loss, _ = policy_loss(before, before.detach(), batch.advantages[rows])
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = packed_logprobs(model, batch, rows)
    change = after - before.detach()
    adv = batch.advantages[rows]
    # a first-order step along the advantage-weighted gradient: the change correlates with the advantage
    assert torch.corrcoef(torch.stack([change, adv]))[0, 1] > 0.3
    assert (change * adv).sum() > 0


def test_clip_regions_count_tokens_clipped_as_trl_does():
    """TRL's clip_ratio/*: low = ratio below 1 - clip_low with a negative advantage, high = above 1 + clip_high with
    a positive one, as token means (hand-computed on four tokens, one of them counted twice by its weight)."""
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([0.5, 0.5, 1.5, 1.5]))  # ratios 0.5, 0.5, 1.5, 1.5
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0])  # low clipped: token 0; high clipped: token 2
    _, stats = policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28, weights=torch.tensor([2.0, 1.0, 1.0, 1.0]))
    assert stats["clip_low"] == pytest.approx(2 / 5)
    assert stats["clip_high"] == pytest.approx(1 / 5)
    assert stats["clip_region"] == pytest.approx(3 / 5)
