"""One end-to-end run of one system on one preset and seed: treerpo (--algo treerpo / grpo), TRL's GRPOTrainer
with its own generation (trl) or with treerpo's engine as its rollout_func (trl_rollout), or TRL's Trainer
training TreeRPO through treerpo.integrations.trl.TreeRPOTrainer (trl_treerpo).

Every system gets the same model, prompts (``PromptTask.batch(step, P, seed)``: the same problems at the
same step), reward function, temperature 1 sampling, learning rate, KL coefficient, clip range and
token-mean loss, one optimizer step per rollout. Each step's wall-clock is split into rollout
(sampling), scoring (rewards and advantages), log-probs (the no-grad reference / old passes) and
training (gradient passes and optimizer step). Held-out accuracy is measured between steps with the
same greedy evaluation for every system, outside the timed region.
"""

from __future__ import annotations

import hashlib
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from e2e_presets import TREE_SYSTEMS, Preset

from treerpo.data.tasks import load_task, make_reward
from treerpo.sampling.evaluation import pass_at_1

SYSTEMS = ("treerpo", "grpo", "trl", "trl_rollout", "trl_treerpo")
TRL_SYSTEMS = ("trl", "trl_rollout", "trl_treerpo")


def hash_reward(completions: list[str], golds: list[str]) -> list[float]:
    """A deterministic pseudo-random 0/1 score of the text (random weights solve nothing; this gives almost every
    group a non-zero advantage, so every system trains on almost every token)."""
    return [float(hashlib.blake2b(c.encode(), digest_size=1).digest()[0] & 1) for c in completions]


def model_path(preset: Preset) -> str | None:
    if preset.model == "tiny":
        return None
    if preset.model == "smollm2":
        from treerpo.models.smollm2 import smollm2_dir

        return str(smollm2_dir())
    if preset.model == "random-qwen2-1.5b":
        from e2e_random_model import random_qwen2_dir

        return str(random_qwen2_dir())
    raise ValueError(f"unknown preset model {preset.model!r}")


def reward_for(preset: Preset, task):
    if preset.reward == "hash":
        return hash_reward
    return make_reward(task.reward_kind)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mib() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class HeldOut:
    """Greedy pass@1 on the preset's held-out problems (the same for every system)."""

    def __init__(self, preset: Preset, steps: int, task, tokenizer, reward_fn):
        self.preset, self.steps, self.task, self.tokenizer, self.reward_fn = preset, steps, task, tokenizer, reward_fn

    def due(self, step: int) -> bool:
        every = self.preset.eval_every
        return self.preset.eval_size > 0 and (step == 0 or step == self.steps or (every and step % every == 0))

    def __call__(self, model) -> float:
        prompts, golds = zip(*self.task.eval, strict=True)
        return pass_at_1(
            model, self.tokenizer, list(prompts), list(golds), self.reward_fn, self.preset.max_new_tokens
        ).accuracy


def _run_record(preset, system, seed, budget, group_size) -> dict:
    return {
        "system": system,
        "seed": seed,
        "budget": budget,
        "preset": preset.name,
        "group_size": group_size,
        "planned_steps": preset.steps_for(system, budget),
        "leaves_per_prompt": preset.leaves if system in TREE_SYSTEMS else group_size,
        "steps": [],
        "evals": [],
    }


def _add_eval(run: dict, held_out: HeldOut, model, step: int) -> None:
    if held_out.due(step):
        wall = sum(s["step_s"] for s in run["steps"])
        generated = sum(s["tokens_generated"] for s in run["steps"])
        run["evals"].append({"step": step, "wall_s": wall, "tokens_generated": generated, "accuracy": held_out(model)})


# ---- treerpo ------------------------------------------------------------------------------------------
def run_treerpo(preset: Preset, algo: str, seed: int, budget: str, log=print) -> dict:
    from treerpo.config import TrainConfig
    from treerpo.training.trainer import Trainer

    group_size = preset.group_size(budget)
    steps = preset.steps_for(algo, budget)
    config = TrainConfig(
        algo=algo,
        model=model_path(preset),
        dataset=preset.dataset,
        eval_dataset=preset.eval_dataset,
        eval_size=max(preset.eval_size, 1),
        output_dir=tempfile.mkdtemp(prefix=f"e2e-{algo}-"),
        max_steps=steps,
        seed=seed,
        prompts_per_step=preset.prompts_per_step,
        branching=list(preset.branching),
        segment_tokens=preset.segment_tokens,
        group_size=group_size,
        max_new_tokens=preset.max_new_tokens,
        max_prompt_tokens=preset.max_prompt_tokens,
        lr=preset.lr,
        kl_coef=preset.kl_coef,
        tau=preset.tau,
        micro_batch_tokens=preset.micro_batch_tokens,
        kv_pool_tokens=preset.kv_pool_tokens,
        eval_every=0,
        save_every=0,
    )
    trainer = Trainer(config, log=lambda *a: None)
    trainer.reward_fn = reward_for(preset, trainer.task)
    held_out = HeldOut(preset, steps, trainer.task, trainer.tokenizer, trainer.reward_fn)
    run = _run_record(preset, algo, seed, budget, group_size)
    _add_eval(run, held_out, trainer.model, 0)
    for step in range(steps):
        sync()
        record = trainer.train_step(step)
        sync()
        run["steps"].append(
            {
                k: record[k]
                for k in (
                    "step_s",
                    "rollout_s",
                    "scoring_s",
                    "logprobs_s",
                    "training_s",
                    "tokens_generated",
                    "tokens_trained",
                    "reward_mean",
                    "response_tokens_mean",
                )
            }
        )
        _add_eval(run, held_out, trainer.model, step + 1)
        log(f"{algo} seed {seed} step {step + 1}/{steps}: {record['step_s']:.2f} s")
    trainer.close()
    run["peak_memory_MiB"] = peak_memory_mib()
    return run


# ---- TRL ----------------------------------------------------------------------------------------------
class _Timers:
    """Wraps a TRL trainer's phases with timers (its own timings reach only wandb/mlflow/trackio)."""

    def __init__(self, trainer, phases: dict[str, str], grad_free: tuple[str, ...] = ()):
        self.phase = dict.fromkeys(phases.values(), 0.0)
        self.phase.update({k: 0.0 for k in ("rollout_s", "scoring_s", "logprobs_s")})
        self.completion_tokens = self.trained_tokens = 0
        self.response_tokens_mean = self.reward_mean = 0.0
        for method, phase in phases.items():
            self._wrap(trainer, method, phase, only_without_grad=method in grad_free)

    @classmethod
    def for_grpo(cls, trainer) -> "_Timers":
        timers = cls(
            trainer,
            {
                "_generate": "rollout_s",
                "_calculate_rewards": "scoring_s",
                "_get_per_token_logps_and_entropies": "logprobs_s",
            },
            grad_free=("_get_per_token_logps_and_entropies",),
        )
        score = trainer._generate_and_score_completions

        def counted(inputs):
            out = score(inputs)
            lengths = out["completion_mask"].sum(dim=1)
            timers.completion_tokens += int(lengths.sum())  # generated, and all in TRL's loss (it keeps every group)
            timers.trained_tokens += int(lengths.sum())
            timers.response_tokens_mean = float(lengths.float().mean())
            return out

        trainer._generate_and_score_completions = counted
        rewards = trainer._calculate_rewards

        def scored(*args, **kwargs):
            out = rewards(*args, **kwargs)
            timers.reward_mean = float(torch.nansum(out, dim=1).mean())
            return out

        trainer._calculate_rewards = scored
        return timers

    @classmethod
    def for_trees(cls, trainer) -> "_Timers":
        """TreeRPOTrainer: sampling, scoring (rewards and advantages), packing with old/reference log-probs."""
        from treerpo.trees.token_weights import loss_token_count

        timers = cls(trainer, {"sample_trees": "rollout_s", "score_trees": "scoring_s", "prepare_chunks": "logprobs_s"})
        score = trainer.score_trees

        def counted(trees, rows):
            score(trees, rows)
            lengths = [n for t in trees for n in t.completion_lengths()]
            timers.completion_tokens += sum(t.generated_tokens for t in trees)
            timers.trained_tokens += sum(loss_token_count(t) for t in trees)
            timers.response_tokens_mean = sum(lengths) / max(len(lengths), 1)
            leaf_rewards = [r for t in trees for r in t.reward[t.leaves()]]
            timers.reward_mean = sum(leaf_rewards) / max(len(leaf_rewards), 1)

        trainer.score_trees = counted
        return timers

    def _wrap(self, trainer, name: str, phase: str, only_without_grad: bool = False) -> None:
        fn = getattr(trainer, name)

        def timed(*args, **kwargs):
            counts = not (only_without_grad and torch.is_grad_enabled())
            if counts:
                sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if counts:
                sync()
                self.phase[phase] += time.perf_counter() - start
            return out

        setattr(trainer, name, timed)

    def take(self, step_s: float) -> dict:
        out = {
            **self.phase,
            "step_s": step_s,
            "tokens_generated": self.completion_tokens,
            "tokens_trained": self.trained_tokens,
            "reward_mean": self.reward_mean,
            "response_tokens_mean": self.response_tokens_mean,
        }
        out["training_s"] = step_s - sum(self.phase.values())
        self.phase = dict.fromkeys(self.phase, 0.0)
        self.completion_tokens = self.trained_tokens = 0
        return out


def trl_common(preset: Preset, seed: int, output_dir: str, steps: int) -> dict:
    """GRPOConfig settings as a knowledgeable user sets them for this comparison: treerpo's hyper-parameters,
    fp32, no gradient checkpointing (a small model does not need it), no logging backends."""
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        seed=seed,
        data_seed=seed,
        num_iterations=1,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=preset.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=preset.kl_coef,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        shuffle_dataset=False,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def trl_config(preset: Preset, group_size: int, seed: int, output_dir: str):
    """TRL's GRPO: one optimizer step a rollout (gradient accumulation over it for a big model)."""
    from trl import GRPOConfig

    completions = preset.prompts_per_step * group_size
    per_device = min(preset.trl_per_device_batch or completions, completions)
    if completions % per_device:
        raise ValueError(f"trl_per_device_batch={per_device} must divide the {completions} completions of a step")
    accumulation = completions // per_device  # a big model: gradient accumulation over one generation batch
    return GRPOConfig(
        **trl_common(preset, seed, output_dir, preset.steps),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
        num_generations=group_size,
        max_completion_length=preset.max_new_tokens,
        scale_rewards="group",
    )


def tree_trl_config(preset: Preset, seed: int, output_dir: str, steps: int):
    """TreeRPOTrainer: the preset's tree, the whole generation batch in one TRL step (one optimizer step a
    rollout), packed micro-batches of treerpo's size."""
    from treerpo.integrations.trl import TreeRPOConfig

    return TreeRPOConfig(
        **trl_common(preset, seed, output_dir, steps),
        branching=list(preset.branching),
        segment_tokens=preset.segment_tokens,
        tau=preset.tau,
        per_device_train_batch_size=preset.prompts_per_step * preset.leaves,
        gradient_accumulation_steps=1,
        micro_batch_tokens=preset.micro_batch_tokens,
        kv_pool_tokens=preset.kv_pool_tokens,
    )


def make_trl_trainer(
    system: str, preset: Preset, seed: int, group_size: int, steps: int, model, tokenizer, reward, dataset, callbacks
):
    """(trainer, timers) for one of the TRL systems."""
    from trl import GRPOTrainer

    output_dir = tempfile.mkdtemp(prefix=f"e2e-{system}-")
    if system == "trl_treerpo":
        from treerpo.integrations.trl import TreeRPOTrainer

        trainer = TreeRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=tree_trl_config(preset, seed, output_dir, steps),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        return trainer, _Timers.for_trees(trainer)
    rollout = None
    if system == "trl_rollout":
        from treerpo.integrations.trl import treerpo_rollout

        rollout = treerpo_rollout(pool_tokens=preset.kv_pool_tokens)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=trl_config(preset, group_size, seed, output_dir),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        rollout_func=rollout,
    )
    return trainer, _Timers.for_grpo(trainer)


def run_trl(preset: Preset, system: str, seed: int, budget: str, log=print) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    from treerpo.models.tiny import DEFAULT_MODEL_DIR, load_model_and_tokenizer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    group_size = preset.group_size(budget)
    steps = preset.steps_for(system, budget)
    path = model_path(preset)
    model, tokenizer = load_model_and_tokenizer(path)
    model.config._name_or_path = str(path or DEFAULT_MODEL_DIR)  # TRL loads its reference model from here
    task = load_task(preset.dataset, preset.eval_dataset, max(preset.eval_size, 1), tokenizer)
    reward_fn = reward_for(preset, task)
    batches = [task.batch(step, preset.prompts_per_step, seed) for step in range(steps)]
    rows = [{"prompt": p, "answer": a} for batch in batches for p, a in batch]
    seen_prompts: list[str] = []

    def reward(prompts, completions, answer, **kwargs):
        seen_prompts.extend(prompts)
        return reward_fn(completions, answer)

    run = _run_record(preset, system, seed, budget, group_size)
    run["same_prompts_as_treerpo"] = True  # checked at every step: TRL drew the prompts treerpo draws
    held_out = HeldOut(preset, steps, task, tokenizer, reward_fn)

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            sync()
            run["steps"].append(timers.take(time.perf_counter() - self.started))
            expected = [p for p, _ in batches[state.global_step - 1]]
            if system == "trl_treerpo":  # one reward call per leaf; a branch that ends early has fewer leaves
                run["same_prompts_as_treerpo"] &= set(seen_prompts) == set(expected)
            else:
                run["same_prompts_as_treerpo"] &= sorted(seen_prompts) == sorted(expected * group_size)
            seen_prompts.clear()
            _add_eval(run, held_out, model, state.global_step)
            log(f"{system} seed {seed} step {state.global_step}/{steps}: {run['steps'][-1]['step_s']:.2f} s")

    trainer, timers = make_trl_trainer(
        system, preset, seed, group_size, steps, model, tokenizer, reward, Dataset.from_list(rows), [StepClock()]
    )
    _add_eval(run, held_out, trainer.model, 0)
    trainer.train()
    close = getattr(reward_fn, "close", None)
    if close:
        close()
    run["peak_memory_MiB"] = peak_memory_mib()
    run["trl_config"] = {
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
    }
    return run


def run_system(preset: Preset, system: str, seed: int, budget: str, log=print) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # the same for every system
    started = time.perf_counter()
    run = (
        run_trl(preset, system, seed, budget, log)
        if system in TRL_SYSTEMS
        else run_treerpo(preset, system, seed, budget, log)
    )
    run["process_s"] = time.perf_counter() - started
    return run


def main(argv=None) -> None:
    """The worker the benchmark starts once per (system, seed), so each run's peak memory is its own."""
    import argparse
    import json

    from e2e_presets import get_preset

    parser = argparse.ArgumentParser(description="one end-to-end run (started by benchmarks/e2e.py)")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--budget", choices=("leaves", "tokens"), required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset, steps=args.steps)
    run = run_system(preset, args.system, args.seed, args.budget, log=lambda m: print(m, flush=True))
    Path(args.out).write_text(json.dumps(run))


if __name__ == "__main__":
    main()
