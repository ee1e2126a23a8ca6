"""What of a TRL GRPOTrainer's generation settings treerpo's engine reproduces, and the refusal of the rest."""

from __future__ import annotations

from dataclasses import dataclass

# generation_kwargs the engine honours (the neutral top_k / min_p / repetition_penalty included) or that do
# not change the tokens drawn
HONOURED_KEYS = {
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "pad_token_id",
    "bos_token_id",
    "cache_implementation",
}


class UnsupportedTRLOption(ValueError):
    """A TRL option treerpo would otherwise silently reinterpret."""


@dataclass(frozen=True)
class EngineSampling:
    temperature: float  # 0 = greedy
    top_p: float
    max_new_tokens: int
    eos_ids: tuple[int, ...]


def engine_sampling(trainer, feature: str) -> EngineSampling:
    """The engine's sampling parameters equivalent to ``trainer``'s, or UnsupportedTRLOption naming the option."""
    refuse = _refuser(feature)
    if getattr(trainer, "use_vllm", False):
        refuse("use_vllm=True", "the engine generates with the model being trained; set use_vllm=False")
    if getattr(trainer, "tools", None):
        refuse("tools", "tool calling is not supported by the engine; use TRL's own generation")
    if getattr(trainer, "environment_factories", None) is not None:
        refuse("environment_factory", "environments are not supported by the engine; use TRL's own generation")
    if getattr(trainer, "is_fsdp_enabled", False) or _zero_stage(trainer) == 3:
        refuse(
            "sharded parameters (FSDP, DeepSpeed ZeRO-3)",
            "the engine needs the whole model on each process; use DDP or ZeRO-1/2, or TRL's own generation",
        )
    if getattr(trainer, "use_transformers_continuous_batching", False):
        refuse("use_transformers_continuous_batching=True", "drop it: the engine batches continuously itself")
    settings = {
        "do_sample": True,
        "temperature": trainer.temperature,
        "top_p": trainer.top_p,
        "top_k": trainer.top_k,
        "min_p": trainer.min_p,
        "repetition_penalty": trainer.repetition_penalty,
    }
    extra = dict(trainer.args.generation_kwargs or {})
    unknown = sorted(set(extra) - HONOURED_KEYS)
    if unknown:
        refuse(f"generation_kwargs {unknown}", "only do_sample (False: greedy), temperature and top_p are supported")
    settings.update({k: v for k, v in extra.items() if k in settings})
    for name, neutral, fix in (
        ("top_k", (0, None), "set top_k=0 (the engine samples with temperature and top_p)"),
        ("min_p", (None, 0.0), "set min_p=None"),
        ("repetition_penalty", (1.0, None), "set repetition_penalty=1.0"),
    ):
        if settings[name] not in neutral:
            refuse(f"{name}={settings[name]}", fix)
    greedy = not settings["do_sample"]
    temperature = 0.0 if greedy else float(settings["temperature"])
    top_p = 1.0 if greedy else float(settings["top_p"])
    return EngineSampling(temperature, top_p, int(trainer.max_completion_length), tuple(trainer.eos_token_ids))


def engine_for(trainer, sampling: EngineSampling, pool_tokens: int | None = None, memory_bytes: int | None = None):
    """The trainer's engine, built on the model it trains at first use (its KV pool lives as long as the trainer)."""
    engine = getattr(trainer, "_treerpo_engine", None)
    if engine is None:
        from treerpo.attention import enable_tree_attention
        from treerpo.engine.tree_sampler import TreeSampler
        from treerpo.policy.adapters import base_of

        model = base_of(trainer.accelerator.unwrap_model(trainer.model))  # under peft_config: adapter applied
        enable_tree_attention(model)  # in place: TRL's own forwards keep the model's attention (no tree metadata)
        engine = trainer._treerpo_engine = TreeSampler(
            model, trainer._tokenizer, pool_tokens=pool_tokens, memory_bytes=memory_bytes, eos_ids=sampling.eos_ids
        )
    if getattr(trainer, "optimizer", None) is not None:  # TRL builds it when training starts
        engine.follow_optimizer(trainer.optimizer)
    return engine


def _zero_stage(trainer) -> int | None:
    plugin = getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)
    return getattr(plugin, "zero_stage", None) if plugin is not None else None


def _refuser(feature: str):
    def refuse(option: str, fix: str):
        raise UnsupportedTRLOption(f"{feature} does not support {option}: {fix}")

    return refuse
