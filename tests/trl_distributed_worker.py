"""Run under torchrun by test_trl_distributed.py: TRL training with treerpo on this process's share of the
global batch, then rank 0 saves the weights. ``python -m torch.distributed.run ... trl_distributed_worker.py
KIND GLOBAL_BATCH OUT``; KIND is ``tree`` (TreeRPOTrainer) or ``rollout`` (GRPOTrainer with treerpo_rollout)."""

import json
import os
import sys
import tempfile

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from test_trl_integration import COMMON, chain_rows, tiny, treerpo_trl

from treerpo.integrations.trl import treerpo_rollout


def length_reward(prompts, completions, **kwargs):
    """A reward of the completion alone (not of its row's place in a process's batch)."""
    return [float(len(c) % 3) for c in completions]


def rollout_trainer(global_batch: int, processes: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model, tokenizer = tiny()
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=2,
        per_device_train_batch_size=global_batch // processes,
        num_generations=4,
        max_completion_length=24,
        learning_rate=1e-3,
        beta=0.04,
        seed=0,
        **COMMON,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_list(chain_rows(16)),
        processing_class=tokenizer,
        rollout_func=treerpo_rollout(),
    )


def main() -> None:
    kind, global_batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if kind == "tree":
        trainer = treerpo_trl(
            chain_rows(16), max_steps=2, per_device_train_batch_size=global_batch // processes, beta=0.04, seed=0
        )
    else:
        trainer = rollout_trainer(global_batch, processes)
    trainer.train()
    if trainer.accelerator.is_main_process:
        state = {k: v.detach().cpu() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
        torch.save(state, out)
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        with open(out + ".json", "w") as fh:
            json.dump(logs, fh)


if __name__ == "__main__":
    main()
