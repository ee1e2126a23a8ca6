"""A training run's memory on each rank, phase by phase, before any weight is loaded.

The run holds its *state* throughout (weights, fp32 masters, gradients, AdamW's two moments, the frozen reference,
the engine's KV pool) and passes through four phases, each adding its working set: the rollout (under FSDP2 the
full weights gathered, the decode step's logits and draw buffers), the old/reference log-probs (no-grad forwards),
the training forward and backward (``activations``), and the optimizer step. The peak is the largest phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from treerpo.memory.activations import FP32, HEAD_CHUNK_ROWS, forward_backward_peak
from treerpo.memory.model_shape import ModelShape
from treerpo.memory.workload import PackedShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GATHERED_LAYERS = 2  # FSDP2 keeps the running layer's and the prefetched next layer's weights gathered


@dataclass(frozen=True)
class RunShape:
    """The options a plan reads, resolved (no "auto" left)."""

    dtype: str
    parallel: str  # none, ddp or fsdp
    world_size: int
    checkpointing: bool
    backend: str
    device: str  # cuda or cpu: the optimizer's implementation (foreach on CUDA) differs
    reference: bool  # kl_coef > 0
    kv_pool_tokens: int
    micro_batches: int  # per optimizer step on a rank: > 1 means gradients accumulate across them
    rollout_rows: int  # branches a rank decodes at once (its trees' leaves)
    draw_memory_bytes: int


@dataclass
class MemoryPlan:
    shape: ModelShape
    run: RunShape
    packed: PackedShape
    state: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def total(self) -> int:
        return sum(self.state.values()) + self.phases[self.peak_phase]


def plan_memory(shape: ModelShape, run: RunShape, packed: PackedShape) -> MemoryPlan:
    plan = MemoryPlan(shape, run, packed)
    plan.state = _state(shape, run)
    plan.phases = {
        "rollout": _rollout(shape, run),
        "log-probs": _logprobs(shape, run, packed),
        "forward+backward": _training(shape, run, packed),
        "optimizer step": _optimizer_step(shape, run),
    }
    return plan


def _sharded(run: RunShape) -> bool:
    """FSDP2 holds the parameters: fsdp always, ddp for half precision (fp32 masters replicated on a 1-wide shard
    dimension; policy.parallel)."""
    return run.parallel == "fsdp" or (run.parallel == "ddp" and run.dtype != "float32")


def _local(shape: ModelShape, run: RunShape) -> float:
    """This rank's fraction of the parameters."""
    return 1 / run.world_size if run.parallel == "fsdp" else 1.0


def _state(shape: ModelShape, run: RunShape) -> dict[str, int]:
    b, p = DTYPE_BYTES[run.dtype], shape.parameters
    half = b < FP32
    local = _local(shape, run)
    state = {}
    if _sharded(run):
        state["parameters (fp32, this rank's shard)" if run.parallel == "fsdp" else "parameters (fp32)"] = int(
            p * FP32 * local
        )
    else:
        state["parameters"] = p * b
        if half:
            state["fp32 master weights"] = p * FP32
    if _gradients_held(run):
        state["gradients (fp32)"] = int(p * FP32 * local)
    if run.parallel == "ddp" and not _sharded(run):
        state["DDP gradient buckets"] = p * FP32
    state["AdamW state (fp32)"] = int(2 * p * FP32 * local)
    if run.reference:
        state["reference model"] = int(p * b * (local if run.parallel == "fsdp" else 1))
    state["KV pool"] = run.kv_pool_tokens * 2 * shape.layers * shape.kv_heads * shape.head_dim * b
    return {k: v for k, v in state.items() if v}


def _gradients_held(run: RunShape) -> bool:
    """fp32 gradients live through the whole update when FSDP2 holds them or several micro-batches accumulate into
    them; otherwise they appear during the one backward (the half-precision ones then move to the fp32 masters)."""
    return _sharded(run) or run.micro_batches > 1


def _gathered(shape: ModelShape, run: RunShape, layers: int) -> int:
    """Unsharded compute-dtype weights FSDP2 holds during a forward: the root unit and ``layers`` layers."""
    if not _sharded(run):
        return 0
    return DTYPE_BYTES[run.dtype] * (shape.root_parameters + layers * shape.layer_parameters)


def _rollout(shape: ModelShape, run: RunShape) -> int:
    """Every layer gathered for the whole rollout (FSDP2), and a decode step's logits and draw buffers (chunked to
    ``draw_memory_bytes``)."""
    draw = min(run.draw_memory_bytes, 3 * run.rollout_rows * shape.vocab * FP32)
    return _gathered(shape, run, shape.layers) + draw


def _logprobs(shape: ModelShape, run: RunShape, packed: PackedShape) -> int:
    """A no-grad forward: one layer's temporaries and the LM head's chunk (logits, shifted copy, exponentials)."""
    b = DTYPE_BYTES[run.dtype]
    rows = min(HEAD_CHUNK_ROWS, packed.loss_rows)
    layer = packed.tokens * b * (2 * shape.hidden + 3 * shape.intermediate)
    return _gathered(shape, run, GATHERED_LAYERS) + max(layer, 3 * rows * shape.vocab * FP32)


def _training(shape: ModelShape, run: RunShape, packed: PackedShape) -> int:
    b, p = DTYPE_BYTES[run.dtype], shape.parameters
    if _sharded(run):  # each unit's gradients are reduced (in fp32) and freed as the backward leaves it
        root, layer = shape.root_parameters * (b + FP32), 0
    elif _gradients_held(run) and b == FP32:  # accumulated into the gradients the state holds
        root = layer = 0
    else:
        root, layer = shape.root_parameters * b, shape.layer_parameters * b
    peak = forward_backward_peak(shape, packed, b, run.backend, run.checkpointing, root, layer)
    if b < FP32 and not _sharded(run) and not _gradients_held(run):  # the half-precision gradients become fp32
        peak = max(peak, p * FP32)
    return _gathered(shape, run, GATHERED_LAYERS) + peak


def _optimizer_step(shape: ModelShape, run: RunShape) -> int:
    """AdamW on CUDA (foreach) makes a temporary as large as the parameters (the second moment's square root); on
    the CPU (one tensor at a time) as large as the largest one."""
    local = _local(shape, run)
    gradients = 0 if _gradients_held(run) else shape.parameters * FP32
    largest = max(shape.layer_parameters, shape.vocab * shape.hidden)
    work = int(shape.parameters * FP32 * local) if run.device == "cuda" else 2 * largest * FP32
    return gradients + work
