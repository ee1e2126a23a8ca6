"""``python -m treerpo.plan``: the memory a training run needs on each rank, from the model's config alone.

Takes every option of ``python -m treerpo.train`` plus the launch it plans for (``--world-size``,
``--device-memory-gib``; a ``--device`` other than cpu plans for CUDA), builds the model on the meta device (no
weights read), and prints per rank the state the run holds, each phase's working set, the peak against the device
and, when it does not fit, the single changes that would make it fit.
Exit codes: 0 fits; 3 does not fit; 2 refused input.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, replace

from treerpo.config import ConfigError, TrainConfig, build_parser, config_from_args
from treerpo.memory.model_shape import ModelShape, model_shape
from treerpo.memory.plan import MemoryPlan, RunShape, plan_memory
from treerpo.memory.workload import packed_shape, worst_case_micro_batch
from treerpo.policy.activation_checkpointing import CHECKPOINTING_ABOVE_PARAMETERS

GIB = 1 << 30
PLAN_FLAGS = ("world_size", "device_memory_gib", "json")


def build_plan_parser():
    parser = build_parser()
    parser.prog = "python -m treerpo.plan"
    parser.description = "The memory a treerpo.train run needs on each rank (model built on the meta device)."
    parser.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) of the launch (default: 1)")
    parser.add_argument("--device-memory-gib", type=float, default=80.0, help="memory of one device (default: 80)")
    parser.add_argument("--json", help="also write the plan to this file")
    return parser


def run_shape(config: TrainConfig, shape: ModelShape, world_size: int, device: str) -> RunShape:
    """The options as ``treerpo.train`` would resolve them on ``world_size`` ranks of ``device``."""
    from treerpo.engine.step_draw import DEFAULT_DRAW_MEMORY_BYTES
    from treerpo.training.trainer import tree_spec

    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    parallel = config.parallel if config.parallel != "auto" else ("ddp" if world_size > 1 else "none")
    if parallel == "none" and world_size > 1:
        raise ConfigError(f"--world-size {world_size} with --parallel none; pass --parallel ddp or fsdp")
    if config.prompts_per_step < world_size:
        raise ConfigError(f"prompts_per_step={config.prompts_per_step} is smaller than --world-size {world_size}")
    spec = tree_spec(config)
    per_micro_batch = max(1, config.micro_batch_tokens // (spec.max_prompt_tokens + spec.max_generated_tokens))
    checkpointing = config.gradient_checkpointing
    return RunShape(
        dtype=config.dtype or (shape.dtype if device == "cuda" else "float32"),
        parallel=parallel,
        world_size=world_size,
        checkpointing=checkpointing if checkpointing is not None else shape.parameters > CHECKPOINTING_ABOVE_PARAMETERS,
        backend=config.tree_attention_backend or ("triton" if device == "cuda" else "paths"),
        device=device,
        reference=config.kl_coef > 0,
        kv_pool_tokens=config.kv_pool_tokens,
        micro_batches=math.ceil(_trees_per_minibatch(config, world_size) / per_micro_batch),
        rollout_rows=math.ceil(config.prompts_per_step / world_size) * spec.max_leaves,
        draw_memory_bytes=DEFAULT_DRAW_MEMORY_BYTES,
    )


def _trees_per_minibatch(config: TrainConfig, world_size: int) -> int:
    """A rank's trees in one minibatch: its share of the step's prompts, split into ``minibatches``."""
    return math.ceil(math.ceil(config.prompts_per_step / world_size) / config.minibatches)


def make_plan(config: TrainConfig, world_size: int = 1, device: str = "cuda", shape: ModelShape | None = None):
    from treerpo.training.trainer import tree_spec

    shape = shape or model_shape(config.model)
    run = run_shape(config, shape, world_size, device)
    trees = worst_case_micro_batch(
        tree_spec(config),
        config.micro_batch_tokens,
        shape.vocab,
        config.seed,
        max_trees=_trees_per_minibatch(config, world_size),
    )
    return plan_memory(shape, run, packed_shape(trees))


def ways_to_fit(config: TrainConfig, plan: MemoryPlan, device_bytes: int) -> list[str]:
    """Single changes of the options under which the plan fits ``device_bytes``."""
    run, found = plan.run, []

    def fits(changed: TrainConfig, world_size: int = run.world_size) -> bool:
        return make_plan(changed, world_size, run.device, plan.shape).total <= device_bytes

    if not run.checkpointing and fits(replace(config, gradient_checkpointing=True)):
        found.append("--gradient-checkpointing")
    tokens = config.micro_batch_tokens // 2
    while tokens >= 1 and plan.packed.tokens > min(plan.packed.tree_tokens):
        if fits(replace(config, micro_batch_tokens=tokens)):
            found.append(f"--micro-batch-tokens {tokens}")
            break
        tokens //= 2
    pool = config.kv_pool_tokens // 2
    while pool >= 1024:
        if fits(replace(config, kv_pool_tokens=pool)):
            found.append(f"--kv-pool-tokens {pool}")
            break
        pool //= 2
    for ranks in (2, 4, 8, 16, 32, 64, 128):
        if run.world_size < ranks <= config.prompts_per_step and fits(replace(config, parallel="fsdp"), ranks):
            found.append(f"--parallel fsdp on {ranks} ranks")
            break
    if run.dtype == "float32" and fits(replace(config, dtype="bfloat16")):
        found.append("--dtype bfloat16")
    return found


def render(plan: MemoryPlan, device_bytes: int, advice: list[str]) -> str:
    shape, run, packed = plan.shape, plan.run, plan.packed
    lines = [
        f"memory plan: {shape.name} ({shape.parameters / 1e9:.3f}B parameters, {shape.layers} layers), {run.dtype}, "
        f"{run.parallel if run.parallel != 'none' else 'one process'}"
        f"{f' on {run.world_size} ranks' if run.world_size > 1 else ''}, activation checkpointing "
        f"{'on' if run.checkpointing else 'off'}, {run.backend} tree attention, {run.device}",
        f"training micro-batch (worst case: full prompts and segments, every group kept): {len(packed.tree_tokens)} "
        f"trees, {packed.tokens} tokens; {run.micro_batches} micro-batch(es) per optimizer step",
        "held throughout, per rank:",
        *[f"  {name:<40} {_gib(size)}" for name, size in plan.state.items()],
        "working set of each phase:",
        *[f"  {name:<40} {_gib(size)}" for name, size in plan.phases.items()],
        f"peak per rank: {_gib(plan.total).strip()} (in the {plan.peak_phase}) of {_gib(device_bytes).strip()}: "
        + ("fits" if plan.total <= device_bytes else "does NOT fit"),
    ]
    if plan.total > device_bytes:
        lines.append(
            "fits with: " + (" | ".join(advice) if advice else "no single change; combine them or use more ranks")
        )
    return "\n".join(lines)


def _gib(size: int) -> str:
    return f"{size / GIB:10.3f} GiB"


def plan_record(plan: MemoryPlan, device_bytes: int, advice: list[str]) -> dict:
    return {
        "model": asdict(plan.shape),
        "run": asdict(plan.run),
        "micro_batch": {"trees": len(plan.packed.tree_tokens), "tokens": plan.packed.tokens},
        "state_bytes": plan.state,
        "phase_bytes": plan.phases,
        "peak_bytes": plan.total,
        "peak_phase": plan.peak_phase,
        "device_bytes": device_bytes,
        "fits": plan.total <= device_bytes,
        "ways_to_fit": advice,
    }


def main(argv=None) -> int:
    parser = build_plan_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, PLAN_FLAGS)
        plan = make_plan(config, args.world_size, "cpu" if config.device == "cpu" else "cuda")
    except (ConfigError, FileNotFoundError) as err:
        print(f"treerpo.plan: {err}", file=sys.stderr)
        return 2
    device_bytes = int(args.device_memory_gib * GIB)
    advice = ways_to_fit(config, plan, device_bytes) if plan.total > device_bytes else []
    print(render(plan, device_bytes, advice))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(plan_record(plan, device_bytes, advice), fh, indent=1)
    return 0 if plan.total <= device_bytes else 3


if __name__ == "__main__":
    sys.exit(main())
