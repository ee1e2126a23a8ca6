"""Activation checkpointing of the policy's decoder layers during the packed training forward."""

from __future__ import annotations

import contextlib

CHECKPOINTING_ABOVE_PARAMETERS = 1_000_000_000


def use_activation_checkpointing(requested: bool | None, model) -> bool:
    """As requested, or (None) for models above a billion parameters."""
    if requested is not None:
        return requested
    return sum(p.numel() for p in model.parameters()) > CHECKPOINTING_ABOVE_PARAMETERS


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every decoder layer (the tree metadata reaches the recomputed attention as a
    forward keyword argument: ``attention.context.metadata_kwargs``)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_layers(model) -> list:
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]


@contextlib.contextmanager
def recomputing_layers(layers: list):
    """Transformers checkpoints a layer only in training mode; the policy runs in eval mode (no dropout, the same
    function as the sampler's), so only the checkpointed layers themselves are switched, not their dropouts."""
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
