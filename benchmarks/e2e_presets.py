"""The end-to-end benchmark's presets: model, task, batch shape and run length, identical for every system."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TREE_SYSTEMS = ("treerpo", "trl_treerpo")  # systems that sample the TreeRPO tree (the others sample G answers)


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # "tiny" (the embedded default), "smollm2", or "random-qwen2-1.5b"
    dataset: str  # "synthetic" or a math file
    eval_dataset: str | None
    eval_size: int  # 0: no held-out evaluation (throughput only)
    prompts_per_step: int
    branching: tuple[int, ...]  # the TreeRPO tree
    segment_tokens: int
    steps: int  # GRPO's steps (TreeRPO's follow from the token budget: ``steps_for``)
    eval_every: int
    max_prompt_tokens: int
    lr: float = 5e-5
    kl_coef: float = 0.02
    tau: float = 0.1
    reward: str = "auto"  # "auto": the task's own; "hash": a deterministic pseudo-random score (random weights)
    seeds: tuple[int, ...] = (0, 1, 2)
    micro_batch_tokens: int = 4096
    kv_pool_tokens: int = 1 << 15
    trl_per_device_batch: int | None = None  # completions per TRL forward (None: the whole rollout in one)

    @property
    def leaves(self) -> int:
        out = 1
        for b in self.branching:
            out *= b
        return out

    @property
    def max_new_tokens(self) -> int:
        return len(self.branching) * self.segment_tokens

    @property
    def tree_tokens_per_prompt(self) -> int:
        """Generated tokens of one full tree: L * (b1 + b1*b2 + ...)."""
        total, width = 0, 1
        for b in self.branching:
            width *= b
            total += width
        return total * self.segment_tokens

    def steps_for(self, system: str, budget: str) -> int:
        """Run length: every system gets the same nominal generated-token budget (prompts x longest generation per
        prompt x steps); in ``leaves`` mode the TreeRPO tree generates fewer tokens a step, so it runs more steps."""
        if system not in TREE_SYSTEMS:
            return self.steps
        grpo_tokens = self.group_size(budget) * self.max_new_tokens
        return max(1, round(self.steps * grpo_tokens / self.tree_tokens_per_prompt))

    def group_size(self, budget: str) -> int:
        """GRPO's answers per prompt: the tree's leaves, or as many full answers as the tree's tokens."""
        if budget == "leaves":
            return self.leaves
        return max(2, round(self.tree_tokens_per_prompt / self.max_new_tokens))


PRESETS = {
    # the embedded default task (treerpo's quick start): 1M-parameter Qwen2, chain arithmetic
    "tiny": Preset(
        "tiny",
        "tiny",
        "synthetic",
        None,
        eval_size=256,
        prompts_per_step=32,
        branching=(4, 2, 2),
        segment_tokens=12,
        steps=100,
        eval_every=10,
        max_prompt_tokens=64,
    ),
    # a real model and dataset, a few steps: per-step throughput (no held-out evaluation). The 135M model almost
    # never solves GSM8K, so with the real reward every group has zero advantage and treerpo would skip all
    # training (TRL still runs it); the hash reward gives every group a signal, so both train on every token
    "smollm2": Preset(
        "smollm2",
        "smollm2",
        str(SHARED_DATA / "gsm8k_train.jsonl"),
        None,
        eval_size=0,
        prompts_per_step=4,
        branching=(2, 2, 2),
        segment_tokens=32,
        steps=3,
        eval_every=0,
        max_prompt_tokens=256,
        reward="hash",
        seeds=(0,),
        micro_batch_tokens=2048,
    ),
    # GPU throughput at 1.5B parameters, random weights: the reward is a hash of the text
    "qwen1.5b": Preset(
        "qwen1.5b",
        "random-qwen2-1.5b",
        "synthetic",
        None,
        eval_size=0,
        prompts_per_step=16,
        branching=(4, 2, 2),
        segment_tokens=64,
        steps=4,
        eval_every=0,
        max_prompt_tokens=64,
        reward="hash",
        tau=0.0,
        seeds=(0,),
        micro_batch_tokens=16384,
        kv_pool_tokens=1 << 17,
        trl_per_device_batch=32,
    ),
}


def get_preset(name: str, **overrides) -> Preset:
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})
