"""Test scaffolding: ``trainer.v1.trainer_mode=treerpo_dump`` is the treerpo trainer writing, before each actor update,
what the update receives (advantages, masks, log-probs, rewards, the samples' tree fields) to
``$TREERPO_VERL_DUMP/step<N>.pt``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import register_trainer

from treerpo.integrations.verl.trainer import TreeRPOTrainer, extra_fields

FIELDS = ["responses", "response_mask", "old_log_probs", "rollout_log_probs", "advantages", "rm_scores", "extra_fields"]


@register_trainer("treerpo_dump")
class DumpingTrainer(TreeRPOTrainer):
    def _update_actor(self, batch, metrics):
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=FIELDS)
        out = {k: data[k].to_padded_tensor(0) for k in FIELDS if k != "extra_fields"}
        out["extra_fields"] = extra_fields(data)
        out["is_padding"] = [bool(tag.get("is_padding", False)) for tag in batch.tags]
        folder = Path(os.environ["TREERPO_VERL_DUMP"])
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(out, folder / f"step{self.global_steps}.pt")
        return super()._update_actor(batch, metrics)
