"""The policy wrapped for data parallelism: DDP (a full replica a rank) or FSDP2 (``fully_shard``: parameters,
gradients and optimizer state sharded across ranks).

Both wrap ``PolicyLogprobs``, a module whose ``forward`` is the packed log-probs, so the wrapper's hooks run
around what the trainer calls: DDP's gradient synchronisation, FSDP2's all-gather of the parameters outside the
decoder layers (embeddings, final norm, LM head). Calling ``packed_logprobs`` on the inner model instead would
skip DDP's synchronisation, and under FSDP2 would mix sharded and full tensors.

Sampling and evaluation run through ``with_full_weights``: under FSDP2 every layer is gathered once for the whole
call (no collective a decode step, so ranks may decode for different numbers of steps), then sharded again.

Half precision (bfloat16, float16) at scale keeps what the one-process path keeps (``precision.MasterWeights``):
fp32 master weights and optimizer state, half-precision compute. Both modes then use FSDP2 with a
``MixedPrecisionPolicy``: the parameters are stored in fp32 (the masters, upcast exactly from the loaded
half-precision weights), each unit's forward gathers them cast to the compute dtype, and gradients are reduced in
fp32. "fsdp" shards them over the ranks; "ddp" replicates them (a 2-D mesh whose shard dimension has size 1: a
full replica a rank, gradients all-reduced, as DDP), since torch's DDP would all-reduce half-precision gradients.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from treerpo.policy.logprobs import packed_logprobs

PARALLEL_MODES = ("none", "ddp", "fsdp")


class PolicyLogprobs(nn.Module):
    def __init__(self, model: nn.Module, temperature: float, backend: str | None):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.backend = backend

    def forward(self, batch, rows):
        return packed_logprobs(self.model, batch, rows, temperature=self.temperature, backend=self.backend)

    def with_full_weights(self, fn: Callable):
        """``fn()`` with every parameter gathered (registered as an FSDP2 forward method: the root's own
        parameters are gathered by its pre-forward hook, each layer's here, once)."""
        from torch.distributed.fsdp import FSDPModule

        layers = [m for m in self.modules() if isinstance(m, FSDPModule) and m is not self]
        for layer in layers:
            layer.set_reshard_after_forward(False, recurse=False)  # their forwards inside fn keep the full weights
        for layer in layers:
            layer.unshard()
        try:
            return fn()
        finally:
            for layer in layers:
                layer.reshard()
                layer.set_reshard_after_forward(True, recurse=False)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (each becomes one FSDP2 unit)."""
    from treerpo.policy.logprobs import decoder_of

    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder `layers` list; --parallel fsdp shards one unit a "
            "layer and cannot find them; use --parallel ddp"
        )
    return list(layers)


def wrap_policy(
    model: nn.Module, mode: str, device: torch.device, temperature: float, backend: str | None, trainable: bool = True
):
    """``model`` wrapped for ``mode`` ("ddp" or "fsdp"), computing in the dtype of its parameters (a trainable
    half-precision model gets fp32 master parameters: see the module docstring; a frozen one, the reference, is
    sharded as it is). Build the optimizer from the result's
    ``parameters()`` right away: after FSDP2's first root forward the root's parameters are its gathered copies, and
    an optimizer built then would silently never update them."""
    if mode not in PARALLEL_MODES[1:]:
        raise ValueError(f"parallel mode {mode!r}: choose one of {PARALLEL_MODES[1:]}")
    compute_dtype = next(model.parameters()).dtype
    policy = PolicyLogprobs(model, temperature, backend)
    if mode == "ddp" and compute_dtype == torch.float32:
        from torch.nn.parallel import DistributedDataParallel

        # buffers (rotary frequencies) are equal everywhere: synced once at construction, not every forward
        return DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )
    return _fully_shard(policy, model, mode, device, compute_dtype if trainable else None)


def _fully_shard(policy: PolicyLogprobs, model: nn.Module, mode: str, device: torch.device, compute_dtype):
    """``compute_dtype`` half precision: fp32 masters cast to it in each forward; None or fp32: parameters as they
    are."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    world_size = torch.distributed.get_world_size()
    if mode == "ddp":
        mesh = init_device_mesh(device.type, (world_size, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    mixed = {}
    if compute_dtype not in (None, torch.float32):
        for p in model.parameters():  # the masters: an exact upcast of the loaded half-precision weights
            p.data = p.data.float()
        # inputs are left as the one-process path passes them (tree metadata included), not cast
        mixed["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    units = decoder_layers(model) + [policy]
    for unit in units:
        fully_shard(unit, mesh=mesh, **mixed)
        unit.set_gradient_divide_factor(1.0)  # summed (a plain SUM, which every backend has): ``loss_multiplier``
        unit.set_force_sum_reduction_for_comms(True)
    register_fsdp_forward_method(policy, "with_full_weights")
    return policy


def loss_multiplier(wrapped: nn.Module | None, world_size: int) -> int:
    """What each rank's loss (its share of the global token sum) is multiplied by before backward. torch's DDP
    averages gradients over ranks, so by the world size; the FSDP2 units here sum them, so by 1: a half-precision
    gradient is then computed at the one-process scale (an fp16 gradient scaled by the world size would underflow
    and round elsewhere than one process's)."""
    return world_size if wrapped is not None and not is_sharded(wrapped) else 1


def unwrap(wrapped: nn.Module) -> PolicyLogprobs:
    return getattr(wrapped, "module", wrapped) if not isinstance(wrapped, PolicyLogprobs) else wrapped


def run_with_full_weights(wrapped: nn.Module, fn: Callable):
    """``fn()`` where the inner Hugging Face model can be called directly (sampling, ``generate``)."""
    return unwrap(wrapped).with_full_weights(fn) if is_sharded(wrapped) else fn()


def is_sharded(wrapped: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(wrapped, FSDPModule)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Backward passes inside accumulate locally unless ``enabled`` (the minibatch's last micro-batch)."""
    if is_sharded(wrapped):
        wrapped.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    elif enabled or not hasattr(wrapped, "no_sync"):
        yield
    else:
        with wrapped.no_sync():
            yield


def reshard_all(wrapped: nn.Module) -> None:
    """Every FSDP2 unit back to its shard (the root keeps its gathered copy after a forward without backward)."""
    from torch.distributed.fsdp import FSDPModule

    for module in wrapped.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
