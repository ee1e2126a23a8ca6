"""TreeRPO inside TRL: ``TreeRPOTrainer`` / ``TreeRPOConfig``, subclasses of TRL's GRPO classes.

TRL keeps its Trainer: accelerate, callbacks, logging, checkpoints, ``push_to_hub``, reward functions in its
signature. What changes is a generation batch: each prompt (repeated ``num_generations`` = leaves-per-tree
times by TRL's sampler) becomes one tree sampled by treerpo's engine; the leaves are scored by TRL's reward
functions; treerpo computes node values and sibling-group advantages; and the loss runs on packed trees
(each shared token forwarded once) instead of TRL's padded root-to-leaf rows. Under ``peft_config`` the engine
and the packed forwards run the model with its adapter applied, and the reference is the model with the adapter
disabled (or TRL's "ref" copy of a pretrained adapter active), as TRL computes it. The loss is treerpo's: PPO-clip
with TRL's ``epsilon`` / ``epsilon_high``, k3 KL with ``beta``, divided by the number of loss tokens of the
optimizer step (TRL's ``dapo`` normalisation). Options that would change that meaning are refused.

Several processes (``accelerate launch`` / torchrun, DDP): each samples the trees of its own prompts (whole trees:
its generation batch holds whole groups of ``num_generations`` rows), each tree from its own seed (seed, step,
global prompt index), so the trees do not depend on the number of processes; the loss normalizer, the choice to
train at zero advantage and the logged metrics are global, and the gradients are averaged over processes in fp32
once per optimizer step (the packed forward bypasses DDP's own hooks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import use_adapter

from treerpo.algorithms.advantages import NORMALIZATIONS, VALUE_MODES, compute_advantages
from treerpo.attention import enable_tree_attention
from treerpo.engine.kv_pool import RequestTooLarge
from treerpo.integrations.trl_metrics import rollout_metrics, row_tokens
from treerpo.integrations.trl_sampling import UnsupportedTRLOption, engine_for, engine_sampling
from treerpo.policy.adapters import base_of, is_peft_model
from treerpo.policy.logprobs import packed_logprobs
from treerpo.rewards.scoring import leaf_completions
from treerpo.training.batch import PreparedBatch, batch_loss, prepare_batch
from treerpo.training.minibatch_plan import micro_batches
from treerpo.training.seeding import tree_seed
from treerpo.tree import Tree, TreeSpec
from treerpo.trees.token_weights import loss_token_count

FEATURE = "TreeRPOTrainer"


@dataclass
class TreeRPOConfig(GRPOConfig):
    """GRPOConfig plus the tree. ``num_generations`` is the number of leaves of a tree (prod(branching)) and
    ``max_completion_length`` the deepest path (depth x segment_tokens); both are derived, not set."""

    branching: list[int] = field(
        default_factory=lambda: [4, 2, 2], metadata={"help": "children per node at each level"}
    )
    segment_tokens: int = field(default=12, metadata={"help": "tokens per tree node"})
    value_mode: str = field(default="children_mean", metadata={"help": f"one of {VALUE_MODES}"})
    advantage_norm: str = field(default="group_std", metadata={"help": f"one of {NORMALIZATIONS}"})
    tau: float = field(default=0.1, metadata={"help": "drop sibling groups whose value std is below tau"})
    global_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of each node's global advantage (value against the tree's leaf-reward mean) added to its "
            "local one; 0: local only"
        },
    )
    micro_batch_tokens: int = field(default=8192, metadata={"help": "packed tokens per forward/backward"})
    kv_pool_tokens: int = field(default=1 << 16, metadata={"help": "KV slots of the engine's pool"})
    num_generations: int | None = field(default=None, metadata={"help": "derived: leaves per tree"})
    max_completion_length: int | None = field(default=None, metadata={"help": "derived: depth x segment_tokens"})

    def __post_init__(self):
        spec = TreeSpec(tuple(self.branching), self.segment_tokens)  # validates the shape
        self.branching = list(spec.branching)
        for name, value, derived in (
            ("num_generations", self.num_generations, spec.max_leaves),
            ("max_completion_length", self.max_completion_length, spec.max_new_tokens),
        ):
            if value is not None and value != derived:
                raise UnsupportedTRLOption(
                    f"{FEATURE}: {name}={value} but the tree {self.branching} x "
                    f"{self.segment_tokens} tokens gives {derived}; leave {name} unset"
                )
        self.num_generations, self.max_completion_length = spec.max_leaves, spec.max_new_tokens
        _refuse_unsupported_config(self)
        super().__post_init__()


def _refuse_unsupported_config(args: TreeRPOConfig) -> None:
    """TRL options whose meaning the tree loss would silently change."""
    checks = [
        (args.value_mode in VALUE_MODES, f"value_mode={args.value_mode!r}", f"choose one of {VALUE_MODES}"),
        (
            args.advantage_norm in NORMALIZATIONS,
            f"advantage_norm={args.advantage_norm!r}",
            f"choose one of {NORMALIZATIONS}",
        ),
        (args.tau >= 0, f"tau={args.tau}", "tau must be >= 0"),
        (
            bool(np.isfinite(args.global_weight)) and args.global_weight >= 0,
            f"global_weight={args.global_weight}",
            "global_weight must be a finite number >= 0 (0: local advantages only)",
        ),
        (args.micro_batch_tokens >= 1, f"micro_batch_tokens={args.micro_batch_tokens}", "use a positive count"),
        (
            args.loss_type == "dapo",
            f"loss_type={args.loss_type!r}",
            "the tree loss is token-mean over the optimizer step's loss tokens (TRL's 'dapo'); set loss_type='dapo'",
        ),
        (
            args.importance_sampling_level == "token",
            f"importance_sampling_level={args.importance_sampling_level!r}",
            "sequence-level ratios are undefined for shared tree tokens; use 'token'",
        ),
        (
            args.scale_rewards in ("group", True),
            f"scale_rewards={args.scale_rewards!r}",
            "advantages are normalised by advantage_norm (group_std, mean_only, batch_std); leave scale_rewards unset",
        ),
        (
            args.multi_objective_aggregation == "sum_then_normalize",
            f"multi_objective_aggregation={args.multi_objective_aggregation!r}",
            "leaf rewards are the weighted sum of the reward functions; leave it 'sum_then_normalize'",
        ),
        (
            not args.mask_truncated_completions,
            "mask_truncated_completions=True",
            "a truncated leaf still scores its path; set it to False",
        ),
        (args.top_entropy_quantile >= 1.0, f"top_entropy_quantile={args.top_entropy_quantile}", "set it to 1.0"),
        (args.entropy_coef == 0.0 and not args.use_adaptive_entropy, "an entropy bonus", "set entropy_coef=0"),
        (args.off_policy_mask_threshold is None, "off_policy_mask_threshold", "leave it None"),
        (args.delta is None, f"delta={args.delta}", "leave it None"),
        (not args.use_vllm, "use_vllm=True", "the engine samples with the trained model; set use_vllm=False"),
        (
            args.steps_per_generation is None or args.steps_per_generation % args.gradient_accumulation_steps == 0,
            f"steps_per_generation={args.steps_per_generation} with gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps}",
            "an optimizer step must cover whole chunks of one generation: make "
            "steps_per_generation a multiple of gradient_accumulation_steps",
        ),
        (not args.log_completions, "log_completions=True", "completion tables are not filled; set it to False"),
        (
            args.eval_strategy in ("no", None) or str(args.eval_strategy) == "IntervalStrategy.NO",
            f"eval_strategy={args.eval_strategy!r}",
            "evaluate with a callback (e.g. treerpo.sampling.evaluation.pass_at_1) and set eval_strategy='no'",
        ),
    ]
    for ok, option, fix in checks:
        if not ok:
            raise UnsupportedTRLOption(f"{FEATURE} does not support {option}: {fix}")


@dataclass
class TreeChunk:
    """What one TRL training step (one micro-step of gradient accumulation) trains on."""

    batches: list[PreparedBatch]
    normalizer: float  # loss tokens of the optimizer step this chunk belongs to, over the number of processes


def train_at_zero_advantage(trees: list[Tree]) -> list[Tree]:
    """A generation with no kept group trains as plain TRL's does when every group's rewards are equal: every
    generated token in the loss at advantage 0, so the optimizer still steps (zero policy gradient; the KL term
    with ``beta > 0``) and the step logs its loss statistics."""
    for tree in trees:
        tree.kept[1:] = True
        tree.advantage = np.zeros(tree.num_nodes)
    return [t for t in trees if loss_token_count(t) > 0]


class TreeRPOTrainer(GRPOTrainer):
    """GRPOTrainer's arguments (``args`` a TreeRPOConfig); trains TreeRPO on trees from treerpo's engine."""

    _tag_names = ["trl", "treerpo"]
    _name = "TreeRPO"

    def __init__(self, model, reward_funcs, args: TreeRPOConfig, *positional, **kwargs):
        if not isinstance(args, TreeRPOConfig):
            raise UnsupportedTRLOption(f"{FEATURE} needs args=TreeRPOConfig(...), got {type(args).__name__}")
        for name in ("rollout_func", "tools", "environment_factory"):
            if kwargs.get(name) is not None:
                raise UnsupportedTRLOption(
                    f"{FEATURE} does not support {name}: trees are sampled by treerpo's engine on the full model"
                )
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise UnsupportedTRLOption(
                f"{FEATURE} runs with DDP (several processes) or in one process, not DeepSpeed/FSDP: the engine "
                "samples on the whole model; for sharded training use treerpo's own trainer (--parallel fsdp)"
            )
        local_rows = args.per_device_train_batch_size * args.steps_per_generation
        if local_rows % self.num_generations:
            raise UnsupportedTRLOption(
                f"{FEATURE}: a process's generation batch (per_device_train_batch_size x steps_per_generation = "
                f"{local_rows} rows) must hold whole trees of num_generations={self.num_generations} leaves; make "
                f"it a multiple of {self.num_generations}"
            )
        if self.accelerator.num_processes > 1 and args.advantage_norm == "batch_std":
            raise UnsupportedTRLOption(
                f"{FEATURE} with {self.accelerator.num_processes} processes does not support "
                "advantage_norm='batch_std' (each process would divide by its own trees' std); use group_std or "
                "mean_only"
            )
        if self.aux_loss_enabled:
            raise UnsupportedTRLOption(
                f"{FEATURE} does not add the MoE router auxiliary loss: set router_aux_loss_coef=0"
            )
        self._step_sums: dict[str, float] = {}  # token-weighted loss statistics of the optimizer step so far
        self.sampling = engine_sampling(self, FEATURE)
        if self.sampling.temperature == 0:
            raise UnsupportedTRLOption(
                f"{FEATURE} does not support greedy decoding (do_sample=False): identical "
                "siblings have no advantage; sample with a temperature"
            )
        if self.sampling.temperature != self.temperature:
            raise UnsupportedTRLOption(
                f"{FEATURE}: generation_kwargs temperature {self.sampling.temperature} differs "
                f"from temperature={self.temperature} (the log-probs' temperature); set "
                "GRPOConfig.temperature only"
            )
        self.spec = TreeSpec(
            tuple(args.branching), args.segment_tokens, temperature=self.sampling.temperature, top_p=self.sampling.top_p
        )
        enable_tree_attention(self._policy())
        if self.ref_model is not None:
            enable_tree_attention(self.accelerator.unwrap_model(self.ref_model))

    def _policy(self):
        """The Hugging Face model TRL trains; under ``peft_config`` the one inside the PeftModel, whose forward
        applies the adapter."""
        return base_of(self.accelerator.unwrap_model(self.model))

    # ---- a generation batch: rows -> trees -> scored trees -> chunks ----------------------------------
    def _prepare_inputs(self, generation_batch) -> TreeChunk:
        if not self.model.training:
            raise UnsupportedTRLOption(f"{FEATURE} has no evaluation loop; set eval_strategy='no'")
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            trees = self.sample_trees(generation_batch)
            self.score_trees(trees, generation_batch)
            self._buffered_inputs = self.prepare_chunks(trees)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def sample_trees(self, rows: list[dict]) -> list[Tree]:
        """One tree per prompt of the generation batch (TRL repeats each prompt ``num_generations`` times)."""
        leaves = self.num_generations
        prompts = [rows[i]["prompt"] for i in range(0, len(rows), leaves)]
        for i, prompt in enumerate(prompts):
            if any(r["prompt"] != prompt for r in rows[i * leaves : (i + 1) * leaves]):
                raise RuntimeError(f"{FEATURE}: the generation batch does not repeat each prompt {leaves} times")
        prompt_ids, images, _ = self._tokenize_prompts(prompts)
        if images is not None:
            raise UnsupportedTRLOption(f"{FEATURE} does not support images")
        spec = replace(self.spec, max_prompt_tokens=max(max(len(p) for p in prompt_ids), 1))
        infos = [{"prompt": p, "row": i * leaves} for i, p in enumerate(prompts)]
        first = self.accelerator.process_index * len(prompts)  # processes hold consecutive slices of the batch
        seeds = [tree_seed(self.args.seed, self._step, first + i) for i in range(len(prompts))]
        engine = engine_for(self, self.sampling, self.args.kv_pool_tokens)
        started = time.perf_counter()
        try:
            trees = engine.sample([list(p) for p in prompt_ids], spec, infos, seeds)
        except RequestTooLarge as error:
            raise RequestTooLarge(f"{error} (here: TreeRPOConfig.kv_pool_tokens)") from None
        self._metrics["train"]["timing/rollout_s"].append(time.perf_counter() - started)
        return trees

    def score_trees(self, trees: list[Tree], rows: list[dict]) -> None:
        """Leaf rewards from TRL's reward functions (weighted sum), then node values and advantages."""
        keys, texts = leaf_completions(trees, self._tokenizer)
        leaf_rank = {}
        inputs = []
        for t, leaf in keys:
            rank = leaf_rank[t] = leaf_rank.get(t, -1) + 1
            inputs.append(rows[trees[t].info["row"] + rank])
        prompts = [trees[t].info["prompt"] for t, _ in keys]
        completions = (
            [[{"role": "assistant", "content": c}] for c in texts]
            if is_conversational({"prompt": prompts[0]})
            else texts
        )
        completion_ids = [trees[t].path_token_ids(leaf, include_prompt=False).tolist() for t, leaf in keys]
        per_func = self._local_rewards(inputs, prompts, completions, completion_ids)
        unscorable = torch.isnan(per_func).all(dim=1).nonzero().flatten().tolist()
        if unscorable:
            raise ValueError(
                f"{FEATURE}: every reward function returned None for completion {unscorable[0]} "
                f"({completions[unscorable[0]]!r}); a tree needs a reward on every leaf"
            )
        rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1).cpu().numpy()
        for (t, leaf), r in zip(keys, rewards, strict=True):
            trees[t].reward[leaf] = float(r)
        stats = compute_advantages(
            trees, self.args.value_mode, self.args.advantage_norm, self.args.tau, global_weight=self.args.global_weight
        )
        self._log_rollout(trees, keys, rewards, per_func, stats)

    def _local_rewards(self, inputs, prompts, completions, completion_ids) -> torch.Tensor:
        """TRL's ``_calculate_rewards`` for this process's leaves. It gathers every process's rows, which needs as
        many rows on each: a process with fewer leaves (early EOS) pads with copies of its last leaf, whose
        rewards are dropped here."""
        count = len(prompts)
        width = int(self._gather_floats([count]).max())
        if width > count:
            pad = lambda items: items + [items[-1]] * (width - count)  # noqa: E731
            inputs, prompts, completions, completion_ids = map(pad, (inputs, prompts, completions, completion_ids))
        per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids)
        start = self.accelerator.process_index * width if len(per_func) > width else 0
        return per_func[start : start + count]

    def _log_rollout(self, trees, keys, rewards, per_func, stats) -> None:
        """TRL's rollout metrics over every process's trees (as TRL gathers its completions)."""
        metrics = self._metrics["train"]
        leaf_tree = np.array([t for t, _ in keys], dtype=np.int64)
        local = (trees, leaf_tree, rewards, per_func.cpu().numpy(), stats["kept_groups"], stats["groups"])
        parts = gather_object([local]) if self.accelerator.num_processes > 1 else [local]
        offsets = np.cumsum([0] + [len(part[0]) for part in parts])
        trees = [t for part in parts for t in part[0]]
        leaf_tree = np.concatenate([part[1] + offset for part, offset in zip(parts, offsets, strict=False)])
        values = rollout_metrics(
            trees,
            leaf_tree,
            np.concatenate([part[2] for part in parts]),
            np.concatenate([part[3] for part in parts]),
            self.reward_func_names,
        )
        for name, value in values.items():
            metrics[name].append(value)
        kept, groups = sum(part[4] for part in parts), sum(part[5] for part in parts)
        metrics["tree/kept_group_fraction"].append(kept / max(groups, 1))
        self.state.num_input_tokens_seen += row_tokens(trees)
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]

    def prepare_chunks(self, trees: list[Tree]) -> list[TreeChunk]:
        """The trees with loss tokens split, whole, into ``steps_per_generation`` chunks (one per TRL step),
        each packed into micro-batches; every chunk knows the loss tokens of its optimizer step."""
        steps, accumulation = self.args.steps_per_generation, self.args.gradient_accumulation_steps
        trainable = [t for t in trees if loss_token_count(t) > 0]
        if not self._sum_over_processes([len(trainable)])[0]:  # no kept group on any process
            trainable = train_at_zero_advantage(trees)
        groups = [[trainable[i] for i in idx] for idx in np.array_split(np.arange(len(trainable)), steps)]
        tokens = self._sum_over_processes([sum(loss_token_count(t) for t in group) for group in groups])
        off_policy = self.num_iterations > 1 or accumulation % (steps * self.num_iterations) != 0
        chunks = []
        for g, group in enumerate(groups):
            start = g - g % accumulation
            # the optimizer step's loss tokens on every process, per process: the processes' gradients are averaged
            # (as DDP's), and TRL logs the mean of their losses, the step's token-mean loss
            normalizer = sum(tokens[start : start + accumulation]) / self.accelerator.num_processes
            chunks.append(
                TreeChunk(
                    [self._prepare(micro, off_policy) for micro in micro_batches(group, self.args.micro_batch_tokens)],
                    normalizer,
                )
            )
        return chunks

    def _prepare(self, trees: list[Tree], off_policy: bool) -> PreparedBatch:
        return prepare_batch(
            trees,
            self.accelerator.device,
            lambda packed, rows: self._logprobs(self._policy(), packed, rows),
            self._reference_logprobs if self.beta != 0.0 else None,
            old_logprobs=off_policy,
        )

    def _reference_logprobs(self, packed, rows):
        """TRL's reference model; with a PEFT model (TRL keeps none) the policy with its adapters disabled, or
        with TRL's "ref" copy of a pretrained adapter active, as TRL computes it."""
        if self.ref_model is not None:
            return self._logprobs(self.accelerator.unwrap_model(self.ref_model), packed, rows)
        peft_model = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(peft_model):
            raise RuntimeError(f"{FEATURE}: beta > 0 but TRL built no reference model")
        with use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None):
            return self._logprobs(self._policy(), packed, rows)

    def _logprobs(self, model, packed, rows):
        """Under TRL's mixed precision (accelerate patches ``model.forward`` with autocast; the packed forward
        calls the decoder body, so it takes the same autocast here)."""
        with self.accelerator.autocast():
            return packed_logprobs(model, packed, rows, temperature=self.temperature)

    # ---- the loss -----------------------------------------------------------------------------------
    def micro_batch_loss(self, batch: PreparedBatch, normalizer: int) -> torch.Tensor:
        logp = self._logprobs(self._policy(), batch.packed, batch.rows)
        loss, stats = batch_loss(
            batch,
            logp,
            clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
            kl_coef=self.beta,
            normalizer=normalizer,
            kl_times_ratio=self.args.use_bias_correction_kl,
        )
        tokens = len(batch.rows) if batch.weights is None else float(batch.weights.sum())
        for name, value in {**stats, "tokens": 1.0}.items():
            self._step_sums[name] = self._step_sums.get(name, 0.0) + value * tokens
        return loss

    def _log_step_statistics(self) -> None:
        """The optimizer step's loss statistics as token means over every process's tokens; TRL's
        ``clip_ratio/low_min`` and ``high_max`` over the processes' own means, as TRL gathers them."""
        sums, self._step_sums = self._step_sums, {}
        names = ["kl", "clip_fraction", "ratio_mean", "clip_low", "clip_high", "clip_region", "tokens"]  # every process
        local = [sums.get(n, 0.0) for n in names]
        totals = dict(zip(names, self._sum_over_processes(local), strict=True))
        if totals["tokens"] == 0:
            return
        means = {n: totals[n] / totals["tokens"] for n in names if n != "tokens"}
        metrics = self._metrics["train"]
        for name in ("kl", "clip_fraction", "ratio_mean") if self.beta != 0.0 else ("clip_fraction", "ratio_mean"):
            metrics[name].append(means[name])
        own = {n: sums.get(n, 0.0) / sums["tokens"] for n in ("clip_low", "clip_high")} if sums.get("tokens") else {}
        gathered = self._gather_floats([own.get("clip_low", float("nan")), own.get("clip_high", float("nan"))])
        metrics["clip_ratio/low_mean"].append(means["clip_low"])
        metrics["clip_ratio/low_min"].append(float(np.nanmin(gathered[:, 0])))
        metrics["clip_ratio/high_mean"].append(means["clip_high"])
        metrics["clip_ratio/high_max"].append(float(np.nanmax(gathered[:, 1])))
        metrics["clip_ratio/region_mean"].append(means["clip_region"])

    def compute_loss(self, model, inputs: TreeChunk, return_outputs=False, num_items_in_batch=None):
        """The chunk's loss (its share of the optimizer step's token-mean loss), all micro-batches at once."""
        if return_outputs:
            raise ValueError(f"{FEATURE} does not return outputs")
        losses = [self.micro_batch_loss(b, inputs.normalizer) for b in inputs.batches]
        return torch.stack(losses).sum() if losses else self._zero_loss()

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-step: a backward per packed micro-batch, so only one micro-batch's activations live."""
        started = time.perf_counter()
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers
            self.optimizer.train()
        chunk = self._prepare_inputs(inputs)
        total = self._zero_loss().detach()
        for batch in chunk.batches:
            with self.compute_loss_context_manager():
                loss = self.micro_batch_loss(batch, chunk.normalizer)
            self.accelerator.backward(loss)
            total = total + loss.detach()
        if self.accelerator.sync_gradients:
            if self.accelerator.num_processes > 1:
                self._average_gradients_over_processes()
            self._log_step_statistics()
        self._step += 1
        self._current_train_step_time += time.perf_counter() - started
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return total

    def _sum_over_processes(self, values: list[float]) -> list[float]:
        if self.accelerator.num_processes == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def _gather_floats(self, values: list[float]) -> np.ndarray:
        """[processes, len(values)]."""
        if self.accelerator.num_processes == 1:
            return np.asarray([values], dtype=np.float64)
        local = torch.tensor([values], dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.gather(local).cpu().numpy()

    def _average_gradients_over_processes(self) -> None:
        """Each process's loss is its tokens' loss over the step's global token count per process, so the step's
        gradient is the processes' average (fp32, one flat buffer a dtype); a parameter without a gradient on a
        process adds zeros there."""
        params = [p for p in self._policy().parameters() if p.requires_grad]
        for dtype in {p.dtype for p in params}:
            group = [p for p in params if p.dtype == dtype]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            flat = flat.float()
            torch.distributed.all_reduce(flat)
            flat /= self.accelerator.num_processes
            for p, part in zip(group, flat.split([p.numel() for p in group]), strict=True):
                p.grad = part.view_as(p).to(dtype)

    def _zero_loss(self) -> torch.Tensor:
        return torch.zeros((), device=self.accelerator.device, requires_grad=False)
