"""One rank's side of a check in test_distributed.py, launched by torchrun: ``python distributed_worker.py TASK
CONFIG_JSON RESULT_PREFIX``. Each task writes what the test compares to ``RESULT_PREFIX`` files."""

from __future__ import annotations

import json
import sys

import torch

from treerpo.config import make_config
from treerpo.training.seeding import seed_everything, step_seed
from treerpo.training.trainer import Trainer


def tree_record(tree) -> dict:
    return {"parent": tree.parent.tolist(), "token_ids": tree.token_ids.tolist(), "offsets": tree.offsets.tolist()}


def rollout_trees(trainer: Trainer, steps: int) -> list[list[dict]]:
    """The trees this rank samples at each step, in global prompt order within its share."""
    out = []
    for step in range(steps):
        seed_everything(step_seed(trainer.config.seed, step))
        out.append([tree_record(t) for t in trainer.rollout(step)])
    return out


def update_without_kept_groups_on(trainer: Trainer, idle_rank: int) -> None:
    """Step 0's update where rank ``idle_rank``'s trees have no kept group (nothing to train on there)."""
    seed_everything(step_seed(trainer.config.seed, 0))
    trees = trainer.rollout(0)
    from treerpo.rewards.scoring import score_trees

    score_trees(trees, trainer.tokenizer, trainer.reward_fn)
    trainer.advantages(trees)
    if trainer.world.rank == idle_rank:
        for tree in trees:
            tree.kept[:] = False
            tree.advantage[:] = 0.0
    trainer.update(trees)


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(trainer.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v.clone() for k, v in state.items()}


def main(task: str, config_json: str, prefix: str) -> None:
    trainer = Trainer(make_config(json.loads(config_json)), log=lambda *a: None)
    try:
        if task == "trees":
            torch.save(rollout_trees(trainer, 2), f"{prefix}.rank{trainer.world.rank}.pt")
        elif task == "uneven":
            update_without_kept_groups_on(trainer, idle_rank=1)
            weights = full_weights(trainer)
            if trainer.world.is_main:
                torch.save(weights, f"{prefix}.weights.pt")
        else:
            raise SystemExit(f"unknown task {task!r}")
    finally:
        trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
