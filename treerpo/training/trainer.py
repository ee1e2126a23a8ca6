"""The training loop: sample trees, score them, compute advantages, one packed PPO update, repeat."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from treerpo.algorithms.advantages import compute_advantages
from treerpo.algorithms.grpo import grpo_spec
from treerpo.attention import enable_tree_attention
from treerpo.attention.kernel_check import set_kernel_verification
from treerpo.config import ConfigError, TrainConfig
from treerpo.data.tasks import load_task, make_reward
from treerpo.engine.kv_pool import RequestTooLarge
from treerpo.engine.scheduler import worst_case_tokens
from treerpo.models.tiny import load_model_and_tokenizer
from treerpo.policy.activation_checkpointing import (
    checkpointed_layers,
    enable_activation_checkpointing,
    recomputing_layers,
    use_activation_checkpointing,
)
from treerpo.policy.adapters import adapter_disabled, add_lora
from treerpo.policy.logprobs import packed_logprobs
from treerpo.policy.parallel import (
    PolicyLogprobs,
    gradient_sync,
    loss_multiplier,
    run_with_full_weights,
    wrap_policy,
)
from treerpo.policy.precision import MasterWeights, resolve_dtype
from treerpo.rewards.scoring import score_trees
from treerpo.runtime.checkpoint import latest_checkpoint
from treerpo.runtime.distributed import World, close_world, init_world
from treerpo.runtime.finite_guard import all_finite
from treerpo.runtime.graceful_stop import GracefulStop
from treerpo.runtime.run_lock import RunLock
from treerpo.sampling.evaluation import pass_at_1
from treerpo.sampling.generation import encode_prompts
from treerpo.sampling.prompt_rules import check_prompts
from treerpo.sampling.reference_sampler import ReferenceTreeSampler
from treerpo.training.batch import Minibatch, batch_loss, prepare_batch
from treerpo.training.checkpointing import Checkpointing
from treerpo.training.metrics import MetricsLog, plot_metrics
from treerpo.training.minibatch_plan import filler_tree, micro_batches, minibatch_indices
from treerpo.training.seeding import seed_everything, step_seed, tree_seed
from treerpo.tree import Tree, TreeSpec
from treerpo.trees.token_weights import loss_token_count, loss_weight


def tree_spec(config: TrainConfig) -> TreeSpec:
    if config.algo == "grpo":
        return grpo_spec(
            config.group_size, config.max_new_tokens, config.max_prompt_tokens, config.temperature, config.top_p
        )
    return TreeSpec(
        tuple(config.branching),
        config.segment_tokens,
        config.max_prompt_tokens,
        config.temperature,
        config.top_p,
        fork_entropy=config.fork_entropy or None,
        min_segment_tokens=config.min_segment_tokens,
    )


def make_sampler(config: TrainConfig, model, tokenizer, compute_dtype: torch.dtype | None = None):
    if config.sampler == "reference":
        return ReferenceTreeSampler(model, tokenizer, config.sampler_batch_size, config.truncate_prompts)
    from treerpo.engine.tree_sampler import TreeSampler

    return TreeSampler(
        model,
        tokenizer,
        pool_tokens=config.kv_pool_tokens,
        truncate_prompts=config.truncate_prompts,
        kv_dtype=compute_dtype,
        compile=config.compile,
    )


def compile_summary(sampler) -> dict:
    """What ``--compile`` did in this process: graphs compiled, seconds compiling, and why it fell back, if it did."""
    from treerpo.engine.compiled_layers import compile_seconds, recompiles

    compiled = getattr(getattr(sampler, "runner", None), "compiled", None)
    return {
        "graphs": recompiles(),
        "compile_s": compile_seconds(),
        "fell_back": None if compiled is None else compiled.failed,
    }


class Trainer(Checkpointing):
    """The loop: sample, score, prepare, update, evaluate, save (resume, checkpoints and stops: ``Checkpointing``)."""

    def __init__(self, config: TrainConfig, log=print):
        self.config = config.validate()
        hf_logging.disable_progress_bar()
        self.out = Path(config.output_dir)
        self.lock = None
        self.world = World()
        try:
            self.config.validate_launch()
            self.world = init_world(
                self.config.device if self.config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            )
            self.log = log if self.world.is_main else (lambda *a, **k: None)
            if self.world.initialized:
                self.log(
                    f"data parallel: {self.config.parallel} on {self.world.size} ranks{self.config._parallel_source}"
                )
            if self.world.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                self.lock = RunLock(self.out).acquire()
            self.world.barrier()
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        set_kernel_verification(config.verify_kernels)
        self.device = (
            self.world.device
            if self.world.initialized
            else torch.device(
                "cuda"
                if config.device == "auto" and torch.cuda.is_available()
                else "cpu"
                if config.device == "auto"
                else config.device
            )
        )
        self.reward_fn = None
        if config.prompts_per_step < self.world.size:
            raise ConfigError(
                f"prompts_per_step={config.prompts_per_step} is smaller than the number of ranks "
                f"({self.world.size}): some ranks would have no tree to sample; raise --prompts-per-step "
                "or launch fewer processes"
            )
        load_dtype = resolve_dtype(config.dtype, self.device)
        self.model, self.tokenizer = load_model_and_tokenizer(
            config.model, dtype=load_dtype, allow_download=config.allow_download
        )
        self.dtype = next(self.model.parameters()).dtype  # "auto" (CUDA default): the checkpoint's own
        self.task = load_task(config.dataset, config.eval_dataset, config.eval_size, self.tokenizer)
        self.spec = tree_spec(config)
        self._check_inputs()
        self.model = enable_tree_attention(self.model).to(self.device)  # loaded in its dtype: RoPE buffers stay fp32
        self.adapter = None  # the PeftModel around self.model when a LoRA adapter is trained (policy.adapters)
        if config.lora_rank:
            alpha = config.lora_alpha or 2 * config.lora_rank
            with torch.random.fork_rng(devices=[]):  # the adapter's initial weights follow --seed alone
                torch.manual_seed(config.seed)
                self.adapter = add_lora(self.model, config.lora_rank, alpha, config.lora_targets)
        # one process keeps fp32 masters here; DDP/FSDP2 keep them as their (sharded) parameters (policy.parallel)
        half = self.dtype != torch.float32
        self.master = MasterWeights(self.model) if half and config.parallel == "none" else None
        if use_activation_checkpointing(config.gradient_checkpointing, self.model):
            enable_activation_checkpointing(self.model)
        self.checkpointed = checkpointed_layers(self.model)  # found once, not on every training forward
        # the reference: a frozen copy, or with an adapter the same model with the adapter disabled
        self.reference = self._frozen_copy(self.model) if config.kl_coef > 0 and self.adapter is None else None
        self.policy = self.reference_policy = None  # DDP / FSDP2 wrappers of the log-prob forward
        if config.parallel != "none":
            self._wrap_for_parallel()
        trained = (
            self.master.params
            if self.master is not None
            else [p for p in (self.policy or self.model).parameters() if p.requires_grad]
        )
        self.optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
        self.sampler = make_sampler(config, self.model, self.tokenizer, self.dtype)
        self.start_step, self.elapsed_before = 0, 0.0
        self.initial_eval = None
        self.counters = {"tokens_generated": 0, "tokens_trained": 0}
        self.nonfinite_streak = 0
        if config.resume:
            self._resume()
        elif latest_checkpoint(self.out) is not None:
            raise ConfigError(
                f"{self.out} holds the checkpoints of an earlier run; continue it with --resume "
                "or choose another --output-dir"
            )
        self.metrics = (
            MetricsLog(self.out / "metrics.jsonl", resume_step=self.start_step, log=self.log)
            if self.world.is_main
            else None
        )
        kind = self.task.reward_kind if config.reward == "auto" else config.reward
        self.reward_fn = make_reward(kind, config.reward_deadline_s)

    def _wrap_for_parallel(self) -> None:
        """DDP or FSDP2 around the log-prob forward; under FSDP2 the frozen reference is sharded too."""
        temperature, backend = self.config.temperature or 1.0, self.config.tree_attention_backend
        self.policy = wrap_policy(self.model, self.config.parallel, self.device, temperature, backend)
        if self.reference is not None:
            self.reference_policy = (
                wrap_policy(self.reference, "fsdp", self.device, temperature, backend, trainable=False)
                if self.config.parallel == "fsdp"
                else PolicyLogprobs(self.reference, temperature, backend)
            )

    def _check_inputs(self) -> None:
        """Everything the run will feed the model, checked before the opening evaluation."""
        train = self.task.training_prompts()
        longest = check_prompts(
            self.model,
            self.tokenizer,
            train,
            encode_prompts(self.tokenizer, train),
            self.spec,
            self.config.truncate_prompts,
            f"dataset {self.config.dataset!r}",
        )
        held_out = [p for p, _ in self.task.eval]
        check_prompts(
            self.model,
            self.tokenizer,
            held_out,
            encode_prompts(self.tokenizer, held_out),
            replace(self.spec, max_prompt_tokens=1 << 30),
            False,
            f"held-out set of {self.config.eval_dataset or self.config.dataset!r} (evaluation never truncates)",
        )
        if self.config.sampler == "engine":
            try:
                worst_case_tokens(
                    [longest],
                    self.spec.max_generated_tokens,
                    self.config.kv_pool_tokens,
                    f"kv_pool_tokens={self.config.kv_pool_tokens}",
                )
            except RequestTooLarge as err:
                raise ConfigError(str(err)) from None

    @staticmethod
    def _frozen_copy(model):
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    # ---- one step ---------------------------------------------------------------------------------
    def rollout(self, step: int) -> list[Tree]:
        """This rank's trees: its share of the step's prompts, each tree seeded from (seed, step, prompt index)."""
        pairs = self.task.batch(step, self.config.prompts_per_step, self.config.seed)
        mine = self.world.shard(len(pairs))
        prompt_ids = encode_prompts(self.tokenizer, [pairs[i][0] for i in mine])
        infos = [{"prompt": pairs[i][0], "answer": pairs[i][1]} for i in mine]
        if self.config.sampler == "reference":  # one process only: draws from the global torch RNG
            return self.sampler.sample(prompt_ids, self.spec, infos)
        seeds = [tree_seed(self.config.seed, step, i) for i in mine]
        return run_with_full_weights(self.policy, lambda: self.sampler.sample(prompt_ids, self.spec, infos, seeds))

    def advantages(self, trees: list[Tree]) -> dict[str, int]:
        """Advantages within each tree; ``batch_std`` divides by the std over the kept nodes of every rank's trees."""
        config = self.config
        distributed_scale = self.world.initialized and config.advantage_norm == "batch_std"
        norm = "mean_only" if distributed_scale else config.advantage_norm
        adv = compute_advantages(trees, config.value_mode, norm, config.tau, global_weight=config.global_weight)
        if distributed_scale:
            self._divide_by_global_std(trees)
        groups, kept = self.world.sum([adv["groups"], adv["kept_groups"]])
        return {"groups": int(groups), "kept_groups": int(kept)}

    def _divide_by_global_std(self, trees: list[Tree], eps: float = 1e-6) -> None:
        centred = np.concatenate([t.advantage[t.kept] for t in trees] + [np.zeros(0)])
        count, total = self.world.sum([len(centred), centred.sum()])
        if count == 0:
            return
        mean = total / count
        (squares,) = self.world.sum([((centred - mean) ** 2).sum()])
        scale = math.sqrt(squares / count) + eps
        for tree in trees:
            tree.advantage = tree.advantage / scale

    def _prepare(self, trees: list[Tree]) -> list[Minibatch]:
        """Minibatches of whole trees chosen over the global batch, this rank's members packed into micro-batches
        of at most ``micro_batch_tokens`` tokens (padded to the longest rank's count), with old and reference
        log-probs computed through the same path as the new ones."""
        multiple_updates = self.config.ppo_epochs > 1 or self.config.minibatches > 1
        token_weight = self.config.token_weight
        counts, weighted = (
            map(
                list,
                zip(
                    *[
                        c
                        for part in self.world.gather(
                            [(loss_token_count(t), loss_weight(t, token_weight)) for t in trees]
                        )
                        for c in part
                    ],
                    strict=True,
                ),
            )
            if self.world.initialized or trees
            else ([], [])
        )
        first = self.world.shard(self.config.prompts_per_step).start
        groups = minibatch_indices(counts, self.config.minibatches)
        micros = [
            micro_batches(
                [trees[i - first] for i in group if 0 <= i - first < len(trees)], self.config.micro_batch_tokens
            )
            for group in groups
        ]
        widths = self.world.max([len(m) for m in micros]) if groups else []
        filler = filler_tree(self.tokenizer.eos_token_id or 0)
        minibatches = []
        for group, micro, width in zip(groups, micros, widths, strict=True):
            prepared = []
            for i in range(int(width)):
                real = i < len(micro)
                prepared.append(
                    prepare_batch(
                        micro[i] if real else [filler],
                        self.device,
                        self._train_logprobs,
                        self._reference_logprobs if self.config.kl_coef > 0 else None,
                        token_weight,
                        old_logprobs=multiple_updates,
                        filler=not real,
                    )
                )
            minibatches.append(Minibatch(sum(weighted[i] for i in group), prepared, sum(counts[i] for i in group)))
        return minibatches

    def _logprobs(self, model, packed, rows):
        return packed_logprobs(
            model, packed, rows, temperature=self.config.temperature or 1.0, backend=self.config.tree_attention_backend
        )

    def _train_logprobs(self, packed, rows):
        return self.policy(packed, rows) if self.policy is not None else self._logprobs(self.model, packed, rows)

    def _reference_logprobs(self, packed, rows):
        if self.reference_policy is not None:
            return self.reference_policy(packed, rows)
        if self.adapter is not None:
            with adapter_disabled(self.adapter):
                return self._logprobs(self.model, packed, rows)
        return self._logprobs(self.reference, packed, rows)

    def update(self, trees: list[Tree]) -> dict[str, float]:
        started = time.perf_counter()
        minibatches = self._prepare(trees)
        logprobs_s = time.perf_counter() - started
        if not minibatches:
            return {
                "loss": 0.0,
                "tokens_trained": 0,
                "tokens_forward": 0,
                "optimizer_steps": 0,
                "skipped_updates": 0,
                "logprobs_s": logprobs_s,
            }
        stats: dict[str, list[float]] = {}
        counts = {"tokens_forward": 0, "optimizer_steps": 0, "skipped_updates": 0}
        for _ in range(self.config.ppo_epochs):
            for i in np.random.permutation(len(minibatches)):
                applied = self._optimizer_step(minibatches[i], stats, counts)
                counts["optimizer_steps" if applied else "skipped_updates"] += 1
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out["tokens_trained"] = int(sum(mb.tokens for mb in minibatches))
        out["logprobs_s"] = logprobs_s
        counts["tokens_forward"] = int(self.world.sum([counts["tokens_forward"]])[0])
        return {**out, **counts}

    def _optimizer_step(self, minibatch: Minibatch, stats: dict, counts: dict) -> bool:
        """One gradient step over a minibatch (all ranks' shares); not applied (optimizer state untouched) when the
        loss or the gradient norm is not finite on any rank. Statistics are token means over the minibatch."""
        normalizer, batches = minibatch.normalizer, minibatch.batches
        scale = loss_multiplier(self.policy, self.world.size)
        self.optimizer.zero_grad(set_to_none=True)
        sums = dict.fromkeys(["loss", "clip_fraction", "ratio_mean", "kl", "nonfinite"], 0.0)
        for i, b in enumerate(batches):
            sync = (
                gradient_sync(self.policy, i == len(batches) - 1)
                if self.policy is not None
                else contextlib.nullcontext()
            )
            with sync:
                with recomputing_layers(self.checkpointed):
                    logp = self._train_logprobs(b.packed, b.rows)
                loss, s = batch_loss(
                    b,
                    logp,
                    clip_low=self.config.clip_low,
                    clip_high=self.config.clip_high,
                    kl_coef=self.config.kl_coef,
                    normalizer=normalizer,
                )
                if b.filler:
                    loss = loss * 0.0
                (loss * scale if scale != 1 else loss).backward()
            if self.master is not None:  # accumulate in fp32, not in the model's half precision
                self.master.grads_to_master()
            if b.filler:
                continue
            counts["tokens_forward"] += b.packed.num_tokens
            tokens = len(b.rows) if b.weights is None else float(b.weights.sum())
            sums["loss"] += loss.item()
            sums["nonfinite"] += 0.0 if all_finite([loss.detach()]) else 1.0
            for k in ("clip_fraction", "ratio_mean", "kl"):
                sums[k] += s.get(k, 0.0) * tokens
        reduced = dict(zip(sums, self.world.sum(list(sums.values())), strict=True))
        for k in ("clip_fraction", "ratio_mean") + (("kl",) if self.config.kl_coef > 0 else ()):
            stats.setdefault(k, []).append(reduced[k] / normalizer)
        stats.setdefault("loss", []).append(reduced["loss"])
        trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, self.config.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        stats.setdefault("grad_norm", []).append(float(grad_norm))
        if reduced["nonfinite"] > 0 or not all_finite([grad_norm]):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        if self.master is not None:
            self.master.master_to_model()
        getattr(self.sampler, "on_weights_updated", lambda: None)()
        return True

    def evaluate(self) -> float:
        """Pass@1 on the held-out set, each rank evaluating its share, the scores gathered."""
        prompts, golds = zip(*self.task.eval, strict=True)
        mine = self.world.shard(len(prompts))

        def run():
            return pass_at_1(
                self.model,
                self.tokenizer,
                [prompts[i] for i in mine],
                [golds[i] for i in mine],
                self.reward_fn,
                self.spec.max_new_tokens,
                n=self.config.eval_samples,
                temperature=self.config.eval_temperature,
                top_p=self.config.top_p,
                batch_size=self.config.sampler_batch_size,
            )

        scores = np.concatenate(self.world.gather(run_with_full_weights(self.policy, run).scores))
        return float(scores.mean()) if scores.size else 0.0

    def train_step(self, step: int) -> dict:
        seed_everything(step_seed(self.config.seed, step))
        t0 = time.perf_counter()
        trees = self.rollout(step)
        t1 = time.perf_counter()
        rewards = score_trees(trees, self.tokenizer, self.reward_fn)
        adv = self.advantages(trees)
        t2 = time.perf_counter()
        upd = self.update(trees)
        t3 = time.perf_counter()
        lengths = np.concatenate([t.completion_lengths() for t in trees] + [np.zeros(0)])
        reward_sum, correct, leaves, generated, length_sum, answers = self.world.sum(
            [
                rewards.sum(),
                (rewards > 0.5).sum(),
                len(rewards),
                sum(t.generated_tokens for t in trees),
                lengths.sum(),
                len(lengths),
            ]
        )
        return {
            "step": step + 1,
            "reward_mean": float(reward_sum / leaves) if leaves else 0.0,
            "accuracy": float(correct / leaves) if leaves else 0.0,
            "leaves": int(leaves),
            "groups": adv["groups"],
            "kept_groups": adv["kept_groups"],
            "tokens_generated": int(generated),
            "response_tokens_mean": float(length_sum / answers) if answers else 0.0,
            **upd,
            "rollout_s": t1 - t0,
            "scoring_s": t2 - t1,
            "training_s": t3 - t2 - upd["logprobs_s"],
            "step_s": t3 - t0,
        }

    # ---- the loop -----------------------------------------------------------------------------------
    def train(self) -> dict:
        """Train to ``max_steps``. SIGINT/SIGTERM stop after the current step with a checkpoint
        (``TrainingInterrupted``); a second signal stops at once (``KeyboardInterrupt``)."""
        with GracefulStop() as stop:
            return self._train(stop)

    def _train(self, stop: GracefulStop) -> dict:
        from tqdm.auto import tqdm

        config = self.config
        self.started = time.perf_counter()
        if self.initial_eval is None:
            self.initial_eval = self.evaluate()
            self.log(f"initial held-out accuracy: {self.initial_eval:.3f}")
        final_eval = self.initial_eval
        bar = tqdm(
            range(self.start_step, config.max_steps),
            initial=self.start_step,
            total=config.max_steps,
            desc=f"{config.algo}",
            dynamic_ncols=True,
            disable=not self.world.is_main,
        )
        done, stop_signal = self.start_step, None
        for step in bar:
            stop_signal = self._agreed_stop(stop)
            if stop_signal is not None:
                break
            record = self.train_step(step)
            self.counters["tokens_generated"] += record["tokens_generated"]
            self.counters["tokens_trained"] += record["tokens_trained"]
            done = step + 1
            self._track_nonfinite(record)
            if (config.eval_every and done % config.eval_every == 0) or done == config.max_steps:
                final_eval = record["eval_accuracy"] = self.evaluate()
            if self.metrics is not None:
                self.metrics.append(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.2f}", eval=f"{final_eval:.2f}")
            self._raise_if_diverged(done)
            if (config.save_every and done % config.save_every == 0) or done == config.max_steps:
                self.save(done)
        bar.close()
        if stop_signal is not None and done < config.max_steps:
            self._stop_on_signal(stop_signal, done)
        if self.start_step >= config.max_steps:
            final_eval = self.evaluate()
        return self._write_summary(final_eval)

    def _agreed_stop(self, stop: GracefulStop) -> int | None:
        """The signal that stops the run before the next step: every rank stops after the same step."""
        signum = int(self.world.max([stop.requested or 0])[0])
        return signum or None

    def _track_nonfinite(self, record: dict) -> None:
        record["nonfinite"] = record.get("skipped_updates", 0) > 0
        self.nonfinite_streak = self.nonfinite_streak + 1 if record["nonfinite"] else 0

    def _write_summary(self, final_eval: float) -> dict:
        config = self.config
        summary = {
            "algo": config.algo,
            "steps": config.max_steps,
            "initial_eval_accuracy": self.initial_eval,
            "final_eval_accuracy": final_eval,
            "improvement": final_eval - self.initial_eval,
            "wall_time_s": self.elapsed_before + time.perf_counter() - self.started,
            **self.counters,
            "model": config.model or "embedded tiny (treerpo/models/tiny_chain)",
            "dataset": config.dataset,
            "tree": {"branching": list(self.spec.branching), "segment_tokens": self.spec.segment_tokens},
        }
        if config.compile:
            summary["compile"] = compile_summary(self.sampler)
            self.log(
                f"compiled layers: {summary['compile']['graphs']} graphs, {summary['compile']['compile_s']:.1f} s "
                "compiling"
                + (
                    f"; fell back to eager: {summary['compile']['fell_back']}"
                    if summary["compile"]["fell_back"]
                    else ""
                )
            )
        if self.world.initialized:
            summary["world_size"], summary["parallel"] = self.world.size, config.parallel
        if self.world.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            plot_metrics(
                self.metrics.records,
                self.out / "training.png",
                f"{config.algo} on {self.task.name}: held-out {self.initial_eval:.2f} -> {final_eval:.2f}",
                self.initial_eval,
            )
        self.world.barrier()
        return summary

    def close(self) -> None:
        close = getattr(getattr(self, "reward_fn", None), "close", None)
        if close:
            close()
        if self.lock is not None:
            self.lock.release()
        self._release_distributed_state()
        close_world(self.world)

    def _release_distributed_state(self) -> None:
        """The DDP/FSDP2 wrappers, the optimizer and the sampler, freed while the interpreter is alive and before
        the process group goes: left to interpreter exit, work objects gloo still holds can abort the process."""
        if not self.world.initialized:
            return
        for name in ("policy", "reference_policy", "optimizer", "sampler"):
            if hasattr(self, name):
                setattr(self, name, None)
        gc.collect()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
