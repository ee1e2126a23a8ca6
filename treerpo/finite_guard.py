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


def check_weights_finite(model, when: str) -> None:
    if not all_finite(model.parameters()):
        raise NonFiniteError(f"the model's weights are not finite {when}; nothing was written. The learning rate "
                             "is too high for this model (or the data produced an overflow): start again from the "
                             "latest checkpoint with a lower --lr")
