"""The engine's forwards with the decoder layers compiled (``TreeSampler(compile=True)``, ``--compile``).

Each decoder layer's ``forward`` is swapped for one that, inside the engine's forwards only, calls a
``torch.compile``d copy of the class's own ``forward`` (one per class, so every layer of a model shares one
compiled graph: parameters are its inputs). The attention call inside it runs eagerly (``tree`` attention is
excluded from tracing: it reads the step's metadata and picks a backend in Python), so each layer compiles into
two graphs, before and after the attention, in which Inductor fuses the norms, rotary embedding, residual adds
and the MLP's element-wise work. Row counts vary from step to step: the graphs are compiled with the row count
symbolic from the start, so a run compiles each once (``recompiles`` counts them); a forward of one row (which a
symbolic size cannot cover: Dynamo specialises 0 and 1) runs the model's own code. On CUDA,
``mode="reduce-overhead"`` replays each graph as a CUDA graph. A compile or a compiled call that fails falls back
to the model's own code for the rest of the sampler's life, with one warning naming the reason. Training,
``generate`` and plain forwards never run the compiled code.
"""

from __future__ import annotations

import contextvars
import inspect
import types
import warnings

import torch

from treerpo.attention.context import set_within
from treerpo.policy.logprobs import decoder_of

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("treerpo_compiled_layers", default=False)
_COMPILED: dict[tuple[type, str], object] = {}  # (layer class, mode) -> its compiled forward


def compiled_layers_active(active: bool):
    """Within this block (when ``active``), the engine's forwards run the compiled layers."""
    return set_within(_ACTIVE, bool(active))


class CompiledLayers:
    """The swap for one model; ``failed`` holds why the compiled code was given up, if it was."""

    def __init__(self, model, mode: str | None = None):
        self.mode = mode if mode is not None else ("reduce-overhead" if _device(model).type == "cuda" else "default")
        self.failed: str | None = None
        self.layers = list(decoder_of(model).layers)
        for layer in self.layers:
            layer.forward = types.MethodType(_dispatching_forward(self, type(layer)), layer)

    @property
    def active(self) -> bool:
        return self.failed is None

    def compiled_forward(self, cls: type):
        """The class's own ``forward`` under its decorators (argument renames, the activation-checkpointing wrapper:
        nothing an inference forward needs), compiled with the row count symbolic from the start."""
        key = (cls, self.mode)
        if key not in _COMPILED:
            mode = None if self.mode == "default" else self.mode
            _COMPILED[key] = torch.compile(inspect.unwrap(cls.forward), mode=mode, dynamic=True)
        return _COMPILED[key]

    def give_up(self, error: BaseException) -> None:
        self.failed = f"{type(error).__name__}: {error}"
        warnings.warn(f"the compiled decoder layers failed and are not used any more ({self.failed[:500]}); the "
                      "engine runs the model's own code")  # fmt: skip


def _dispatching_forward(owner: CompiledLayers, cls: type):
    own = cls.forward

    def forward(self, *args, **kwargs):
        if not (_ACTIVE.get() and owner.active) or torch.is_grad_enabled() or _rows(args, kwargs) < 2:
            return own(self, *args, **kwargs)  # one row: a compiled graph would specialise (and recompile) for it
        try:
            return owner.compiled_forward(cls)(self, *args, **kwargs)
        except Exception as error:  # a compile or capture the backend cannot do: eager from now on
            owner.give_up(error)
            return own(self, *args, **kwargs)

    return forward


def _rows(args, kwargs) -> int:
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else 2


def recompiles() -> int:
    """Graphs Dynamo has compiled in this process (each layer class's graphs, once per shape it specialised)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_seconds() -> float:
    """Seconds Dynamo and Inductor have spent compiling in this process."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def _device(model) -> torch.device:
    return next(model.parameters()).device
