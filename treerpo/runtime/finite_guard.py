"""Non-finite numbers in training: detected with one host sync, never applied, never checkpointed."""

from __future__ import annotations

from typing import Iterable

import torch


class NonFiniteError(RuntimeError):
    pass


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one reduction a tensor, one sync in all)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def restart_advice(config, latest_checkpoint) -> str:
    """How to go on after a divergence: a new run (a resume may not change lr) from the last good weights."""
    start = f"--model {latest_checkpoint} " if latest_checkpoint else ""
    return (
        f"The learning rate ({config.lr}) is likely too high: start a new run {start}with a lower --lr and "
        "another --output-dir (a resume keeps the lr; a new run from a checkpoint also takes it as the KL "
        "reference)"
    )


def check_weights_finite(model, when: str, advice: str = "") -> None:
    if not all_finite(model.parameters()):
        raise NonFiniteError(f"the model's weights are not finite {when}; no checkpoint was written. {advice}")
