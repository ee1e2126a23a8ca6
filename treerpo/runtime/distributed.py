"""The process group of a ``torchrun`` launch: this rank's place in it and the few collectives the trainer needs.

One process started without torchrun is a world of one: every collective returns its input and nothing is
initialised, so the single-process trainer runs exactly the code it ran before. Every helper here is a
collective: all ranks must call it, in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from treerpo.config import TORCHRUN_VARIABLES, launched_by_torchrun


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collective tensors live (CUDA under NCCL)

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items (shares differ by at most one, lower ranks larger)."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def sum(self, values) -> np.ndarray:
        """Element-wise sum over ranks, in float64."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def max(self, values) -> np.ndarray:
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def min(self, values) -> np.ndarray:
        return self._all_reduce(values, dist.ReduceOp.MIN)

    def _all_reduce(self, values, op) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64)
        if not self.initialized:
            return array
        tensor = torch.as_tensor(array, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.cpu().numpy()

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.initialized:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.initialized:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()


def init_world(device_kind: str, timeout_s: float = 1800.0) -> World:
    """The world of a torchrun launch (process group initialised: NCCL on CUDA, gloo on CPU), or of one process."""
    if not launched_by_torchrun():
        return World()
    rank, size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    if device_kind == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None
        )
    return World(rank, size, local_rank, device)


def close_world(world: World) -> None:
    if world.initialized:
        dist.destroy_process_group()
