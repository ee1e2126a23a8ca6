"""The LM head of the engine's draws: a step's logits, computed the way the device computes fastest.

A half-precision model's head is multiplied in the model's dtype wherever the device has that matmul (tensor cores
on CUDA; AMX or AVX512-BF16/FP16 on a CPU), the products accumulated in fp32. The logits then come out in fp32 on
CUDA (``torch.mm(..., out_dtype=torch.float32)``) and rounded to the model's dtype on a CPU, as vLLM, SGLang and
Hugging Face ``generate`` sample from them. Elsewhere, or with ``precision="fp32"``, the head is converted to fp32
once per weight version (``conversions`` counts it) and the logits are fp32 products of the model's values; that
copy stays in memory (vocabulary x hidden x 4 bytes: 0.9 GiB for Qwen2.5-1.5B), which the memory plan does not
count. The draw itself (``sampling.draw``) is fp32/fp64 either way.

The trainer's head (``policy.lm_head.LMHead``) is not this one: it keeps fp32 products over vocabulary chunks,
with gradients.
"""

from __future__ import annotations

import functools
import warnings

import torch

from treerpo.policy.lm_head import LMHead

PRECISIONS = ("model", "fp32")


@functools.cache
def native_matmul(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` multiplies ``dtype`` matrices in hardware: bf16 on CUDA from Ampere (capability 8.0), fp16 on
    any CUDA GPU; bf16 on a CPU with AVX512-BF16 or AMX, fp16 on one with AMX-FP16. Elsewhere torch emulates them,
    slower than fp32."""
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or (
            dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
        )
    if device.type == "cpu":
        if dtype == torch.bfloat16:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        if dtype == torch.float16:
            return bool(torch.cpu._is_amx_fp16_supported())
    return False


@functools.cache
def fp32_output_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has ``torch.mm(..., out_dtype=torch.float32)`` for ``dtype`` on ``device`` (CUDA), tried
    once on a small case; without it the logits come out in the model's dtype (said once)."""
    if device.type != "cuda":
        return False
    a = torch.ones(2, 8, dtype=dtype, device=device)
    try:
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError) as error:
        warnings.warn(f"no fp32-output {dtype} matmul on {device} ({error}): the draws' logits are rounded to {dtype}")
        return False


class SamplingHead:
    def __init__(self, head: LMHead, precision: str = "model"):
        if precision not in PRECISIONS:
            raise ValueError(f"head precision must be one of {PRECISIONS}, got {precision!r}")
        self.head = head
        self.precision = precision
        self.conversions = 0  # fp32 copies of the head made (one per weight version at most)
        self._copy: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def route(self) -> str:
        """``fp32`` (an fp32 head), ``model`` (the model's dtype, natively) or ``copy`` (a half head's fp32 copy)."""
        weight = self.head.weight
        if weight.dtype == torch.float32:
            return "fp32"
        if self.precision == "model" and native_matmul(weight.dtype, weight.device):
            return "model"
        return "copy"

    def forget_weights(self) -> None:
        """The weights changed: the next call converts the head again (on the ``copy`` route). A change that bumps no
        version counter (a fused optimizer step, a write through ``.data``) is seen only through this call, which
        ``TreeSampler`` makes whenever its weights watch sees a change."""
        self._copy = None

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> fp32 [rows, vocab], post-processed as the model's own forward does (no gradients), in
        place: the logits are the only [rows, vocab] buffer (the draw's memory budget counts 4 bytes a logit)."""
        route = self.route()
        if route == "model":
            logits = self._in_model_dtype(hidden)
        else:
            weight, bias = self._fp32_weights() if route == "copy" else (self.head.weight, self._bias())
            logits = hidden.float() @ weight.t()
            if bias is not None:
                logits.add_(bias.float())
        return self._post_process_(logits)

    def _post_process_(self, logits: torch.Tensor) -> torch.Tensor:
        """``LMHead.post_process``, in place."""
        head = self.head
        if head.logit_scale:
            logits.mul_(head.logit_scale)
        if head.logits_scaling:
            logits.div_(head.logits_scaling)
        if head.softcap:
            logits.div_(head.softcap).tanh_().mul_(head.softcap)
        return logits

    def _bias(self) -> torch.Tensor | None:
        return getattr(self.head.layer, "bias", None)

    def _in_model_dtype(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self.head.weight, self._bias()
        h = hidden.to(weight.dtype)
        if fp32_output_matmul(weight.device, weight.dtype):
            logits = torch.mm(h, weight.t(), out_dtype=torch.float32)
        else:
            logits = (h @ weight.t()).float()
        return logits.add_(bias.float()) if bias is not None else logits

    def _fp32_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self.head.weight, self._bias()
        key = (weight.data_ptr(), weight._version, weight.dtype) + (
            () if bias is None else (bias.data_ptr(), bias._version)
        )
        if self._copy is None or self._copy[0] != key:
            self._copy = (key, weight.detach().float(), None if bias is None else bias.detach().float())
            self.conversions += 1
        return self._copy[1], self._copy[2]
