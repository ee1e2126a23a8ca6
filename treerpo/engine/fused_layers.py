"""The engine's forwards on CUDA with Llama-style RMSNorm and rotary embedding as one kernel each.

Hugging Face's RMSNorm launches about eight kernels and its rotary embedding about ten, in every layer of every
decode step, where a fused kernel launches one (``kernels/rms_norm.py``, ``kernels/rope.py``). They are swapped
in only where a family computes them exactly as Llama does, judged by the code itself (the norm's ``forward``, the
family's ``apply_rotary_pos_emb`` and ``rotate_half`` compiled to the same bytecode as Llama's): a family that
differs (Gemma's ``1 + weight`` norm, partial or interleaved rotary) keeps its own code. And they run only inside
the engine's forwards (``fused_layers_active``), which the model runner turns on for CUDA: training, ``generate``
and the CPU run the model's own code, and so does a ``torch.compile``d trace (Inductor fuses it there; reading the
switch inside a trace would break the graph).
"""

from __future__ import annotations

import contextvars
import dis
import sys
import types

import torch

from treerpo.attention.context import set_within

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("treerpo_fused_layers", default=False)
_ORIGINAL_ROPE: dict[str, types.FunctionType] = {}  # family module name -> its own apply_rotary_pos_emb


def fused_layers_active(active: bool):
    """Within this block (when ``active``), the fused norm and rotary embedding replace the families' own."""
    return set_within(_ACTIVE, bool(active))


def same_code(f, g) -> bool:
    """Whether two functions run the same instructions on the same names and constants (docstrings aside)."""

    def instructions(fn):
        return [(i.opname, i.argval) for i in dis.get_instructions(fn)]

    return instructions(f) == instructions(g)


# Llama's code, verbatim: what a family's own must compile to for the fused kernels to stand in for it
class _LlamaRMSNorm:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _llama_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def plain_function(obj) -> types.FunctionType | None:
    """``obj`` itself, or the function a wrapper (``functools.wraps``, Hugging Face's hub-kernel module) calls."""
    if isinstance(obj, types.FunctionType):
        return obj
    wrapped = getattr(obj, "__wrapped__", None)
    if isinstance(wrapped, types.FunctionType):
        return wrapped
    forward = getattr(type(obj), "forward", None)
    code = getattr(forward, "__code__", None)
    if code is not None and "func" in code.co_freevars:
        cell = forward.__closure__[code.co_freevars.index("func")].cell_contents
        return cell if isinstance(cell, types.FunctionType) else None
    return None


def llama_style_norm(module) -> bool:
    forward = getattr(type(module), "forward", None)
    return (
        isinstance(forward, types.FunctionType)
        and hasattr(module, "variance_epsilon")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and same_code(forward, _LlamaRMSNorm.forward)
    )


def llama_style_rope(family: types.ModuleType) -> bool:
    rope = plain_function(_ORIGINAL_ROPE.get(family.__name__, getattr(family, "apply_rotary_pos_emb", None)))
    rotate = plain_function(getattr(family, "rotate_half", None))
    return (
        rope is not None
        and rotate is not None
        and same_code(rope, _llama_apply_rotary_pos_emb)
        and same_code(rotate, rotate_half)
    )


def enable_fused_layers(model) -> dict[str, int]:
    """Swap the fused kernels in where ``model`` computes exactly as Llama does; returns how many norms and
    families were swapped. Idempotent."""
    norms, families = 0, set()
    for module in model.modules():
        if llama_style_norm(module):
            if not isinstance(module.forward, types.MethodType) or module.forward.__func__ is not _norm_forward:
                module.forward = types.MethodType(_norm_forward, module)
            norms += 1
        family = sys.modules.get(type(module).__module__)
        if (
            family is not None
            and getattr(family, "apply_rotary_pos_emb", None) is not None
            and llama_style_rope(family)
        ):
            if family.__name__ not in _ORIGINAL_ROPE:
                _ORIGINAL_ROPE[family.__name__] = family.apply_rotary_pos_emb
                family.apply_rotary_pos_emb = _rope_for(family.__name__)
            families.add(family.__name__)
    return {"norms": norms, "rope_families": len(families)}


def fused_kernels_work(device: torch.device, dtype: torch.dtype, hidden: int = 64, head_dim: int = 32) -> str | None:
    """None when both fused kernels compile on ``device`` and agree with Llama's own functions on a few rows of the
    model's ``hidden`` size and ``head_dim`` in its compute ``dtype``; else why not (the engine then keeps the
    model's own code)."""
    try:
        from treerpo.kernels import rms_norm, rope

        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 64, generator=gen).to(device, dtype)
        norm = types.SimpleNamespace(
            weight=(torch.rand(64, generator=gen) + 0.5).to(device, dtype), variance_epsilon=1e-6
        )
        checks = [(rms_norm.rms_norm(x, norm.weight, 1e-6), _LlamaRMSNorm.forward(norm, x))]
        q = torch.randn(1, 5, 4, head_dim, generator=gen).to(device, dtype).transpose(1, 2)  # HF's layout
        k = torch.randn(1, 5, 2, head_dim, generator=gen).to(device, dtype).transpose(1, 2)
        angles = torch.rand(1, 5, head_dim // 2, generator=gen) * 6
        cos, sin = (f(torch.cat([angles, angles], -1)).to(device, dtype) for f in (torch.cos, torch.sin))
        checks += list(zip(rope.apply_rope(q, k, cos, sin), _llama_apply_rotary_pos_emb(q, k, cos, sin), strict=True))
    except Exception as error:  # a GPU or Triton build that cannot compile them
        return f"{type(error).__name__}: {error}"
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in checks:
        error = float((got.float() - want.float()).norm() / want.float().norm())
        if not error <= tolerance:
            return f"a fused kernel differs from the model's own code by {error:.3g} (norm-relative)"
    return None


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() or not _ACTIVE.get() or hidden_states.requires_grad or self.weight.dim() != 1:
        return type(self).forward(self, hidden_states)
    from treerpo.kernels import rms_norm

    return rms_norm.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _rope_for(family: str):
    original = _ORIGINAL_ROPE[family]

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (
            torch.compiler.is_compiling()
            or not _ACTIVE.get()
            or unsqueeze_dim != 1
            or q.requires_grad
            or k.requires_grad
        ):
            return original(q, k, cos, sin, unsqueeze_dim)
        from treerpo.kernels import rope

        if not rope.supported(q, k, cos, sin):
            return original(q, k, cos, sin, unsqueeze_dim)
        return rope.apply_rope(q, k, cos, sin)

    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb
