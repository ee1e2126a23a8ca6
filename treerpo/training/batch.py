"""Micro-batches ready for the loss: trees packed, their loss rows and weights, and the old and reference
log-probs computed through the same packed forward as the new ones. Shared by the Trainer and TRL's
TreeRPOTrainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from treerpo.algorithms.loss import policy_loss
from treerpo.tree import Tree
from treerpo.trees.packing import PackedBatch, pack_trees
from treerpo.trees.token_weights import row_weights

LogprobsFn = Callable[[PackedBatch, torch.Tensor], torch.Tensor]  # (packed batch, loss rows) -> log-probs


@dataclass
class PreparedBatch:
    packed: PackedBatch
    rows: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    weights: torch.Tensor | None = None  # float32 per row, when token_weight is not "node"
    filler: bool = False  # padding for the collectives of a rank with fewer micro-batches: its loss counts zero


@dataclass
class Minibatch:
    """One optimizer step's share on this rank; ``normalizer`` is the weighted count of the loss tokens of all ranks'
    shares (``tokens``, unweighted)."""

    normalizer: int
    batches: list[PreparedBatch]
    tokens: int


def batch_loss(batch: PreparedBatch, logprobs: torch.Tensor, **loss_options) -> tuple[torch.Tensor, dict]:
    """``policy_loss`` of a prepared batch: its advantages, token weights and reference log-probs; the old log-probs
    taken at preparation, or (on-policy) the new ones detached. ``loss_options``: clipping, KL, normalizer."""
    old = batch.old_logprobs if batch.old_logprobs is not None else logprobs.detach()
    advantages = batch.packed.advantages[batch.rows]
    return policy_loss(
        logprobs, old, advantages, weights=batch.weights, ref_logprobs=batch.ref_logprobs, **loss_options
    )


@torch.no_grad()
def prepare_batch(
    trees: list[Tree],
    device,
    policy_logprobs: LogprobsFn,
    reference_logprobs: LogprobsFn | None,
    token_weight: str = "node",
    *,
    old_logprobs: bool,
    filler: bool = False,
) -> PreparedBatch:
    """``trees`` packed (unkept nodes pruned) on ``device`` with their loss rows; the policy's log-probs of those rows
    now, when they will be used after the weights change (``old_logprobs``), and the reference policy's."""
    packed = pack_trees(trees, prune_unkept=True)
    rows = packed.loss_mask.nonzero().squeeze(1)
    weights = None
    if token_weight != "node":  # None: every token once, the plain token mean
        weights = torch.from_numpy(
            row_weights(trees, packed.tree_index[rows].numpy(), packed.node_index[rows].numpy(), token_weight)
        ).to(device)
    packed, rows = packed.to(device), rows.to(device)
    old = policy_logprobs(packed, rows) if old_logprobs else None
    ref = reference_logprobs(packed, rows) if reference_logprobs is not None else None
    return PreparedBatch(packed, rows, old, ref, weights, filler=filler)
