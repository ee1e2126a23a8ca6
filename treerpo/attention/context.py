"""The tree metadata of the forward in progress, handed to the attention layers.

Hugging Face models call attention through ``AttentionInterface`` with their own
arguments; the intervals of a packed tree batch travel beside them in a context variable,
set for the duration of one forward.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field

import torch

METADATA_KWARG = "treerpo_metadata"  # the decoder-body keyword that carries the metadata to every attention call


@dataclass
class TreeAttentionMetadata:
    tin: torch.Tensor  # int32 [N]
    tout: torch.Tensor  # int32 [N]
    backend: str = "sdpa"
    cache: dict = field(default_factory=dict)  # per-forward artefacts shared by all layers (e.g. a dense mask)
    max_positions: int | None = None  # the longest path of the batch, for the sliding-window check


_CURRENT: contextvars.ContextVar[object | None] = contextvars.ContextVar("treerpo_tree", default=None)


def current_tree_metadata():
    """The metadata of the forward in progress: TreeAttentionMetadata, PagedAttentionMetadata, or None."""
    return _CURRENT.get()


@contextlib.contextmanager
def set_within(variable: contextvars.ContextVar, value):
    """``variable`` holds ``value`` within this block, and what it held before after it."""
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def attention_metadata(meta):
    """Within this block, layers using the ``tree`` attention run with ``meta``."""
    return set_within(_CURRENT, meta)


def metadata_kwargs(model) -> dict:
    """``{name: metadata}`` to pass to the forward of ``model`` (a decoder body) so that the tree metadata reaches
    the attention layers as a keyword argument too, which activation checkpointing replays; empty outside a block
    or for a model whose forward takes no extra keyword arguments (then only the context variable carries it)."""
    meta = current_tree_metadata()
    if meta is None or not _takes_kwargs(model):
        return {}
    return {METADATA_KWARG: meta}


def prepared_mask(device: torch.device) -> torch.Tensor:
    """The ``attention_mask`` of a forward inside a tree or paged block: transformers takes a 4D mask as already
    prepared and builds none, so it neither reads the packed position ids for sequence boundaries (``.all()`` on the
    device: a host sync every forward, which would also break CUDA-graph capture) nor launches mask kernels. The
    ``tree`` attention never reads it: the block's metadata says what each token sees."""
    return _prepared_mask(torch.device(device))


@functools.cache
def _prepared_mask(device: torch.device) -> torch.Tensor:
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)


def _takes_kwargs(model) -> bool:
    import inspect

    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())


@contextlib.contextmanager
def tree_attention(tin: torch.Tensor, tout: torch.Tensor, backend: str = "sdpa", max_positions: int | None = None):
    """Within this block, layers using the ``tree`` attention treat the batch as a packed tree."""
    with attention_metadata(TreeAttentionMetadata(tin, tout, backend, max_positions=max_positions)):
        yield
