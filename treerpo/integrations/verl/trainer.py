"""``trainer.v1.trainer_mode=treerpo``: verl's synchronous PPO trainer whose ``algorithm.adv_estimator=treerpo``
computes TreeRPO's per-token advantages from the batch's trees (``advantages.py``); any other estimator is verl's.

The advantages are scaled (``verl_token_mean_scale``) so that verl's ``token-mean`` policy loss over the leaves equals
treerpo's packed loss over the trees' distinct tokens; that needs every leaf of a tree in one mini-batch and the
whole batch in one: ``ppo_mini_batch_size`` equal to ``data.train_batch_size``, ``loss_agg_mode=token-mean`` and no
KL loss (refused otherwise, before the first step).
"""

from __future__ import annotations

import torch
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from treerpo.integrations.verl import TRAINER_MODE
from treerpo.integrations.verl.advantages import FIELD, sample_advantages, verl_token_mean_scale

ESTIMATOR = TRAINER_MODE


def extra_fields(data) -> list[dict]:
    """The samples' ``extra_fields`` of a TransferQueue batch: one dict a sample (a NonTensorStack, or a list)."""
    raw = data["extra_fields"]
    return raw.tolist() if hasattr(raw, "tolist") else list(raw)


def check_config(config) -> None:
    """What the equality with treerpo's loss needs, refused with the setting to change."""
    if config.algorithm.adv_estimator != ESTIMATOR:
        return
    actor = config.actor_rollout_ref.actor
    problems = []
    if int(actor.ppo_mini_batch_size) != int(config.data.train_batch_size):
        problems.append(
            f"actor_rollout_ref.actor.ppo_mini_batch_size={actor.ppo_mini_batch_size} must equal "
            f"data.train_batch_size={config.data.train_batch_size} (a tree's leaves in one mini-batch)"
        )
    if actor.loss_agg_mode != "token-mean":
        problems.append(f"actor_rollout_ref.actor.loss_agg_mode={actor.loss_agg_mode} must be token-mean")
    if actor.use_kl_loss:
        problems.append("actor_rollout_ref.actor.use_kl_loss must be False (a KL term needs its own token weights)")
    if config.algorithm.use_kl_in_reward:
        problems.append("algorithm.use_kl_in_reward must be False")
    correction = config.algorithm.get("rollout_correction") or {}
    for name in ("rollout_is", "rollout_rs"):
        if correction.get(name) is not None:
            problems.append(f"algorithm.rollout_correction.{name} must be null (not applied to tree advantages)")
    if problems:
        raise ValueError("adv_estimator=treerpo: " + "; ".join(problems))


@register_trainer(ESTIMATOR)
class TreeRPOTrainer(PPOTrainerSync):
    @property
    def trainer_mode(self) -> str:
        return "sync"  # verl compares the mode with "sync" in several places

    @trainer_mode.setter
    def trainer_mode(self, value) -> None:
        pass

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_config(self.config)

    def _compute_advantage(self, batch, metrics: dict):
        if self.config.algorithm.adv_estimator != ESTIMATOR:
            return super()._compute_advantage(batch, metrics)
        data = tq.kv_batch_get(
            keys=batch.keys,
            partition_id=batch.partition_id,
            select_fields=["response_mask", "rm_scores", "extra_fields"],
        )
        mask_nested = data["response_mask"]
        mask = mask_nested.to_padded_tensor(0)
        rewards = data["rm_scores"].to_padded_tensor(0.0).sum(-1).tolist()
        padding = [bool(tag.get("is_padding", False)) for tag in batch.tags]
        extras = extra_fields(data)
        samples = [None if pad else (extra or {}).get(FIELD) for pad, extra in zip(padding, extras, strict=True)]
        result = sample_advantages(
            samples,
            rewards,
            value_mode=self.config.algorithm.get("treerpo_value_mode", "children_mean"),
            normalization=self.config.algorithm.get("treerpo_normalization", "group_std"),
            tau=float(self.config.algorithm.get("treerpo_tau", 0.1)),
        )
        scale = verl_token_mean_scale(int(mask.sum()), result.loss_tokens)
        advantages = torch.zeros(mask.shape, dtype=torch.float32)
        for i, adv in enumerate(result.advantages):
            if adv is not None:
                n = min(len(adv), mask.shape[1])
                advantages[i, :n] = torch.as_tensor(adv[:n] * scale, dtype=torch.float32)
        advantages *= mask
        nested = response_to_nested(advantages, mask_nested)
        metrics.update({f"treerpo/{k}": float(v) for k, v in result.stats.items()})
        metrics["treerpo/loss_tokens"] = result.loss_tokens
        metrics["treerpo/trees"] = len(result.trees)
        metrics["treerpo/advantage_scale"] = scale
        out = TensorDict({"advantages": nested, "returns": nested.clone()}, batch_size=len(batch))
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=out)
