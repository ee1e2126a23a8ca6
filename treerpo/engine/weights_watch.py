"""What tells the engine that the weights changed, so that K/V computed with old weights is never reused.

Three signals, any of which retires the cache: an optimizer step (``follow``: a hook on the optimizer, which a
fused step does not escape), an explicit announcement (``TreeSampler.on_weights_updated``), and, checked before
every rollout, the weights' fingerprint: each parameter's version counter and storage, and the fp64 sum of its
values, which catches what bumps no version (a fused optimizer step, a write through ``.data``).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch


def _local(param: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter's own shard: the fingerprint is this rank's, with no collective."""
    return param.to_local() if hasattr(param, "to_local") else param


class WeightsWatch:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._seen: tuple | None = None
        self._followed: weakref.WeakSet = weakref.WeakSet()

    def fingerprint(self) -> tuple:
        params = [_local(p.detach()) for p in self.model.parameters()]
        layout = tuple((p._version, p.data_ptr()) for p in params)
        if not params:
            return layout, torch.zeros(0)
        device = params[0].device  # a model spread over several devices: its sums gathered on one
        return layout, torch.stack([p.sum(dtype=torch.float64).to(device) for p in params])

    def changed(self) -> bool:
        """Whether the weights differ from those seen at the last call (or at ``forget``), one host sync."""
        now = self.fingerprint()
        seen, self._seen = self._seen, now
        return seen is not None and (seen[0] != now[0] or not torch.equal(seen[1], now[1]))

    def forget(self) -> None:
        """The caller already knows the weights changed: the next ``changed`` only records them."""
        self._seen = None

    def follow(self, optimizer: torch.optim.Optimizer, on_step: Callable[[], None]) -> None:
        """Call ``on_step`` after every step of ``optimizer`` (fused, foreach or for-loop alike), once however often
        it is asked; a wrapper (accelerate's ``AcceleratedOptimizer``) is followed to the optimizer it steps. An
        optimizer without torch's step hooks (DeepSpeed's, which steps inside ``backward``) is left to the
        fingerprint."""
        while getattr(optimizer, "optimizer", None) is not None:
            optimizer = optimizer.optimizer
        if not hasattr(optimizer, "_optimizer_step_post_hooks") or optimizer in self._followed:
            return
        self._followed.add(optimizer)
        method = weakref.WeakMethod(on_step)  # the optimizer must not keep a discarded engine's pool alive

        def after_step(*_):
            target = method()
            if target is not None:
                target()

        optimizer.register_step_post_hook(after_step)
