"""The training loop: sample trees, score them, compute advantages, one packed PPO update, repeat."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from .algorithms.advantages import compute_advantages
from .algorithms.grpo import grpo_spec
from .algorithms.loss import policy_loss
from .attention import enable_tree_attention
from .attention.hf_integration import smallest_sliding_window
from .attention.kernel_check import set_kernel_verification
from .checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from .config import ConfigError, TrainConfig
from .finite_guard import NonFiniteError, all_finite, check_weights_finite, restart_advice
from .graceful_stop import GracefulStop, TrainingInterrupted
from .data.tasks import load_task, make_reward
from .evaluation import pass_at_1
from .generation import encode_prompts
from .logprobs import packed_logprobs
from .metrics import MetricsLog, plot_metrics
from .models.tiny import load_model_and_tokenizer
from .packing import PackedBatch, pack_trees
from .precision import MasterWeights, resolve_dtype
from .prompt_checks import check_prompts
from .reference_sampler import ReferenceTreeSampler
from .resume import ResumeMismatchError, check_resumable, comparable_config
from .run_lock import RunLock
from .scoring import score_trees
from .tree import Tree, TreeSpec


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int) -> int:
    """Every step reseeds from (seed, step), so a resumed run draws what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def tree_spec(config: TrainConfig) -> TreeSpec:
    if config.algo == "grpo":
        return grpo_spec(config.group_size, config.max_new_tokens, config.max_prompt_tokens, config.temperature,
                         config.top_p)
    return TreeSpec(tuple(config.branching), config.segment_tokens, config.max_prompt_tokens, config.temperature,
                    config.top_p)


def micro_batches(trees: list[Tree], token_budget: int) -> list[list[Tree]]:
    """Consecutive groups of trees of at most ``token_budget`` tokens (a bigger tree goes alone)."""
    groups, current, size = [], [], 0
    for tree in trees:
        if current and size + tree.num_tokens > token_budget:
            groups.append(current)
            current, size = [], 0
        current.append(tree)
        size += tree.num_tokens
    return groups + ([current] if current else [])


CHECKPOINTING_ABOVE_PARAMETERS = 1_000_000_000
MASTER_WEIGHTS = "master_weights.pt"  # fp32 master weights of a half-precision run


def use_activation_checkpointing(config: TrainConfig, model) -> bool:
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing
    return sum(p.numel() for p in model.parameters()) > CHECKPOINTING_ABOVE_PARAMETERS


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every decoder layer (the tree metadata reaches the recomputed attention as a
    forward keyword argument: ``attention.context.metadata_kwargs``)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_layers(model) -> list:
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]


@contextlib.contextmanager
def recomputing_layers(layers: list):
    """Transformers checkpoints a layer only in training mode; the policy runs in eval mode (no dropout, the same
    function as the sampler's), so only the checkpointed layers themselves are switched, not their dropouts."""
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


def has_loss_tokens(tree: Tree) -> bool:
    """A tree some of whose generated tokens are trained on (a kept node with a non-empty segment)."""
    lengths = np.diff(tree.offsets)
    return bool(np.any(tree.kept[1:] & (lengths[1:] > 0)))


def minibatch_trees(trees: list[Tree], minibatches: int) -> list[list[Tree]]:
    """The trainable trees in random order, split into ``minibatches`` groups of whole trees (fewer only when
    fewer trees have loss tokens): the number of optimizer steps does not depend on the micro-batch size."""
    trainable = [t for t in trees if has_loss_tokens(t)]
    if not trainable:
        return []
    order = np.random.permutation(len(trainable))
    return [[trainable[i] for i in chunk] for chunk in np.array_split(order, min(minibatches, len(trainable)))]


def make_sampler(config: TrainConfig, model, tokenizer):
    if config.sampler == "reference":
        return ReferenceTreeSampler(model, tokenizer, config.sampler_batch_size, config.truncate_prompts)
    from .engine.tree_sampler import TreeSampler

    return TreeSampler(model, tokenizer, pool_tokens=config.kv_pool_tokens, truncate_prompts=config.truncate_prompts)


@dataclass
class PreparedBatch:
    packed: PackedBatch
    rows: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None


class Trainer:
    def __init__(self, config: TrainConfig, log=print):
        self.config = config.validate()
        self.log = log
        hf_logging.disable_progress_bar()
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.out).acquire()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        set_kernel_verification(config.verify_kernels)
        self.device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                                   else "cpu" if config.device == "auto" else config.device)
        self.reward_fn = None
        load_dtype = resolve_dtype(config.dtype, self.device)
        self.model, self.tokenizer = load_model_and_tokenizer(config.model, dtype=load_dtype,
                                                              allow_download=config.allow_download)
        self.dtype = next(self.model.parameters()).dtype  # "auto" (CUDA default): the checkpoint's own
        self.task = load_task(config.dataset, config.eval_dataset, config.eval_size, self.tokenizer)
        self.spec = tree_spec(config)
        self._check_inputs()
        self.model = enable_tree_attention(self.model).to(self.device)  # loaded in its dtype: RoPE buffers stay fp32
        self.master = MasterWeights(self.model) if self.dtype != torch.float32 else None
        if use_activation_checkpointing(config, self.model):
            enable_activation_checkpointing(self.model)
        self.checkpointed = checkpointed_layers(self.model)  # found once, not on every training forward
        self.reference = self._frozen_copy(self.model) if config.kl_coef > 0 else None
        trained = self.master.params if self.master is not None else self.model.parameters()
        self.optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
        self.sampler = make_sampler(config, self.model, self.tokenizer)
        self.start_step, self.elapsed_before = 0, 0.0
        self.initial_eval = None
        self.counters = {"tokens_generated": 0, "tokens_trained": 0}
        self.nonfinite_streak = 0
        if config.resume:
            self._resume()
        elif latest_checkpoint(self.out) is not None:
            raise ConfigError(f"{self.out} holds the checkpoints of an earlier run; continue it with --resume "
                             "or choose another --output-dir")
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.start_step, log=self.log)
        kind = self.task.reward_kind if config.reward == "auto" else config.reward
        self.reward_fn = make_reward(kind, config.reward_deadline_s)

    def _check_inputs(self) -> None:
        """Everything the run will feed the model, checked before the opening evaluation."""
        train = self.task.training_prompts()
        longest = check_prompts(self.model, self.tokenizer, train, encode_prompts(self.tokenizer, train),
                                self.spec, self.config.truncate_prompts, f"dataset {self.config.dataset!r}")
        held_out = [p for p, _ in self.task.eval]
        check_prompts(self.model, self.tokenizer, held_out, encode_prompts(self.tokenizer, held_out),
                      replace(self.spec, max_prompt_tokens=1 << 30), False,
                      f"held-out set of {self.config.eval_dataset or self.config.dataset!r} (evaluation never truncates)")
        window = smallest_sliding_window(self.model)
        if window is not None and longest + self.spec.max_new_tokens > window:
            raise ConfigError(f"the model's sliding window ({window} positions) is shorter than a path (prompt up to "
                              f"{longest} + {self.spec.max_new_tokens} generated tokens), and tree attention does "
                              "not implement sliding windows; shorten the tree or the prompts")
        need = longest + self.spec.max_generated_tokens
        if self.config.sampler == "engine" and need > self.config.kv_pool_tokens:
            raise ConfigError(f"one tree may need {need} KV slots (prompt up to {longest} + "
                             f"{self.spec.max_generated_tokens} generated) but kv_pool_tokens="
                             f"{self.config.kv_pool_tokens}; raise kv_pool_tokens or make the tree smaller")

    @staticmethod
    def _frozen_copy(model):
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is None:
            self.log(f"resume: no checkpoint in {self.out}, starting from step 0")
            return
        state = load_trainer_state(checkpoint)
        check_resumable(comparable_config(self.config), state["config"], checkpoint)
        if state.get("dtype", "torch.float32") != str(self.dtype):
            raise ResumeMismatchError(f"resume: {checkpoint} was trained in {state.get('dtype', 'torch.float32')} "
                                      f"but this run resolves --dtype to {self.dtype}; pass --dtype "
                                      f"{state.get('dtype', 'torch.float32').removeprefix('torch.')}")
        loaded, _ = load_model_and_tokenizer(checkpoint)
        self.model.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        if self.master is not None:
            self.master.load_state_dict(torch.load(checkpoint / MASTER_WEIGHTS, weights_only=True))
        self.start_step = state["step"]
        self.elapsed_before = state["wall_time_s"]
        self.initial_eval = state["initial_eval_accuracy"]
        self.counters = state["counters"]
        self.nonfinite_streak = state.get("nonfinite_streak", 0)
        self.log(f"resumed from {checkpoint} at step {self.start_step}")

    # ---- one step ---------------------------------------------------------------------------------
    def rollout(self, step: int) -> list[Tree]:
        pairs = self.task.batch(step, self.config.prompts_per_step, self.config.seed)
        prompt_ids = encode_prompts(self.tokenizer, [p for p, _ in pairs])
        infos = [{"prompt": p, "answer": g} for p, g in pairs]
        return self.sampler.sample(prompt_ids, self.spec, infos)

    def _prepare(self, trees: list[Tree]) -> list[list[PreparedBatch]]:
        """Minibatches of whole trees, each packed into micro-batches of at most ``micro_batch_tokens`` tokens,
        with old and reference log-probs computed through the same path as the new ones."""
        multiple_updates = self.config.ppo_epochs > 1 or self.config.minibatches > 1
        minibatches = []
        for group in minibatch_trees(trees, self.config.minibatches):
            prepared = []
            for micro in micro_batches(group, self.config.micro_batch_tokens):
                packed = pack_trees(micro, prune_unkept=True).to(self.device)
                rows = torch.nonzero(packed.loss_mask).squeeze(1)
                with torch.no_grad():
                    old = self._logprobs(self.model, packed, rows) if multiple_updates else None
                    ref = self._logprobs(self.reference, packed, rows) if self.reference is not None else None
                prepared.append(PreparedBatch(packed, rows, old, ref))
            minibatches.append(prepared)
        return minibatches

    def _logprobs(self, model, packed, rows):
        return packed_logprobs(model, packed, rows, temperature=self.config.temperature or 1.0,
                               backend=self.config.tree_attention_backend)

    def update(self, trees: list[Tree]) -> dict[str, float]:
        started = time.perf_counter()
        minibatches = self._prepare(trees)
        logprobs_s = time.perf_counter() - started
        if not minibatches:
            return {"loss": 0.0, "tokens_trained": 0, "tokens_forward": 0, "optimizer_steps": 0,
                    "skipped_updates": 0, "logprobs_s": logprobs_s}
        stats: dict[str, list[float]] = {}
        counts = {"tokens_forward": 0, "optimizer_steps": 0, "skipped_updates": 0}
        for _ in range(self.config.ppo_epochs):
            for i in np.random.permutation(len(minibatches)):
                applied = self._optimizer_step(minibatches[i], stats, counts)
                counts["optimizer_steps" if applied else "skipped_updates"] += 1
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out["tokens_trained"] = int(sum(len(b.rows) for mb in minibatches for b in mb))
        out["logprobs_s"] = logprobs_s
        return {**out, **counts}

    def _optimizer_step(self, batches: list[PreparedBatch], stats: dict, counts: dict) -> bool:
        """One gradient step over a minibatch; not applied (optimizer state untouched) when the loss or the
        gradient norm is not finite."""
        normalizer = sum(len(b.rows) for b in batches)
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for b in batches:
            with recomputing_layers(self.checkpointed):
                logp = self._logprobs(self.model, b.packed, b.rows)
            old = b.old_logprobs if b.old_logprobs is not None else logp.detach()
            loss, s = policy_loss(logp, old, b.packed.advantages[b.rows], None, self.config.clip_low,
                                  self.config.clip_high, b.ref_logprobs, self.config.kl_coef, normalizer)
            loss.backward()
            if self.master is not None:  # accumulate in fp32, not in the model's half precision
                self.master.grads_to_master()
            losses.append(loss.detach())
            counts["tokens_forward"] += b.packed.num_tokens
            for k, v in {**s, "loss": loss.item() * normalizer / len(b.rows)}.items():
                stats.setdefault(k, []).append(v)
        trained = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, self.config.max_grad_norm)
        stats.setdefault("grad_norm", []).append(float(grad_norm))
        if not all_finite([grad_norm, *losses]):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        if self.master is not None:
            self.master.master_to_model()
        getattr(self.sampler, "on_weights_updated", lambda: None)()
        return True

    def evaluate(self) -> float:
        prompts, golds = zip(*self.task.eval)
        result = pass_at_1(self.model, self.tokenizer, list(prompts), list(golds), self.reward_fn,
                           self.spec.max_new_tokens, n=self.config.eval_samples,
                           temperature=self.config.eval_temperature, top_p=self.config.top_p,
                           batch_size=self.config.sampler_batch_size)
        return result.accuracy

    def train_step(self, step: int) -> dict:
        seed_everything(step_seed(self.config.seed, step))
        t0 = time.perf_counter()
        trees = self.rollout(step)
        t1 = time.perf_counter()
        rewards = score_trees(trees, self.tokenizer, self.reward_fn)
        adv = compute_advantages(trees, self.config.value_mode, self.config.advantage_norm, self.config.tau)
        t2 = time.perf_counter()
        upd = self.update(trees)
        t3 = time.perf_counter()
        generated = sum(t.generated_tokens for t in trees)
        lengths = np.concatenate([t.completion_lengths() for t in trees])
        return {"step": step + 1, "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
                "accuracy": float((rewards > 0.5).mean()) if len(rewards) else 0.0,
                "leaves": int(len(rewards)), "groups": adv["groups"], "kept_groups": adv["kept_groups"],
                "tokens_generated": int(generated), "response_tokens_mean": float(lengths.mean()), **upd,
                "rollout_s": t1 - t0, "scoring_s": t2 - t1, "training_s": t3 - t2 - upd["logprobs_s"],
                "step_s": t3 - t0}

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
        bar = tqdm(range(self.start_step, config.max_steps), initial=self.start_step, total=config.max_steps,
                   desc=f"{config.algo}", dynamic_ncols=True)
        done = self.start_step
        for step in bar:
            if stop.requested is not None:
                break
            record = self.train_step(step)
            self.counters["tokens_generated"] += record["tokens_generated"]
            self.counters["tokens_trained"] += record["tokens_trained"]
            done = step + 1
            self._track_nonfinite(record)
            if (config.eval_every and done % config.eval_every == 0) or done == config.max_steps:
                final_eval = record["eval_accuracy"] = self.evaluate()
            self.metrics.append(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.2f}", eval=f"{final_eval:.2f}")
            self._raise_if_diverged(done)
            if (config.save_every and done % config.save_every == 0) or done == config.max_steps:
                self.save(done)
        bar.close()
        if stop.requested is not None and done < config.max_steps:
            self._stop_on_signal(stop.requested, done)
        if self.start_step >= config.max_steps:
            final_eval = self.evaluate()
        return self._write_summary(final_eval)

    def _track_nonfinite(self, record: dict) -> None:
        record["nonfinite"] = record.get("skipped_updates", 0) > 0
        self.nonfinite_streak = self.nonfinite_streak + 1 if record["nonfinite"] else 0

    def _raise_if_diverged(self, done: int) -> None:
        if self.nonfinite_streak >= self.config.max_nonfinite_steps:
            latest = latest_checkpoint(self.out)
            raise NonFiniteError(
                f"steps {done - self.nonfinite_streak + 1}-{done}: the loss or gradient norm was not finite "
                f"{self.nonfinite_streak} steps in a row (max_nonfinite_steps={self.config.max_nonfinite_steps}); "
                f"their updates were not applied. {restart_advice(self.config, latest)}")

    def save(self, done: int) -> Path:
        check_weights_finite(self.model, f"after step {done}", restart_advice(self.config, latest_checkpoint(self.out)))
        wall = self.elapsed_before + time.perf_counter() - self.started
        extra = {MASTER_WEIGHTS: self.master.state_dict()} if self.master is not None else {}
        return save_checkpoint(self.out, done, self.model, self.tokenizer, self.optimizer,
                               {"config": comparable_config(self.config), "wall_time_s": wall,
                                "counters": self.counters, "initial_eval_accuracy": self.initial_eval,
                                "nonfinite_streak": self.nonfinite_streak, "dtype": str(self.dtype)},
                               keep=self.config.keep_checkpoints,
                               extra=extra)

    def _stop_on_signal(self, signum: int, done: int) -> None:
        latest = latest_checkpoint(self.out)
        if latest is None or load_trainer_state(latest)["step"] != done:
            latest = self.save(done)
        name = signal.Signals(signum).name
        raise TrainingInterrupted(f"{name}: stopped after step {done} of {self.config.max_steps}; checkpoint "
                                  f"{latest}; continue with the same options plus --resume", signum)

    def _write_summary(self, final_eval: float) -> dict:
        config = self.config
        summary = {"algo": config.algo, "steps": config.max_steps, "initial_eval_accuracy": self.initial_eval,
                   "final_eval_accuracy": final_eval, "improvement": final_eval - self.initial_eval,
                   "wall_time_s": self.elapsed_before + time.perf_counter() - self.started, **self.counters,
                   "model": config.model or "embedded tiny (treerpo/models/tiny_chain)", "dataset": config.dataset,
                   "tree": {"branching": list(self.spec.branching), "segment_tokens": self.spec.segment_tokens}}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_metrics(self.metrics.records, self.out / "training.png",
                     f"{config.algo} on {self.task.name}: held-out {self.initial_eval:.2f} -> {final_eval:.2f}",
                     self.initial_eval)
        return summary

    def close(self) -> None:
        close = getattr(getattr(self, "reward_fn", None), "close", None)
        if close:
            close()
        self.lock.release()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
