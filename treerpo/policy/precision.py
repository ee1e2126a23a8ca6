"""Mixed precision for half-precision models: fp32 master weights and optimizer state, half-precision compute.

The model (rollout, log-probs, gradients) runs in its own dtype (bfloat16 or float16); the optimizer
steps fp32 copies of its parameters, which are rounded back into the model after every step, so
small updates are not lost to bf16's 8-bit mantissa. The LM head and log-softmax accumulate in fp32
(``lm_head.LMHead``). An fp32 model needs none of this: the optimizer steps its parameters directly.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype | str:
    """What to load the model in: the option's dtype; by default "auto" (the checkpoint's own) on CUDA, fp32 on
    CPU."""
    if name is not None:
        return DTYPES[name]
    return "auto" if device.type == "cuda" else torch.float32


class MasterWeights:
    """fp32 copies of a model's trainable parameters; the optimizer is built over ``params``."""

    def __init__(self, model):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params]

    def grads_to_master(self) -> None:
        """Add the model's (half-precision) gradients to the fp32 master gradients and clear them."""
        for master, p in zip(self.params, self.model_params, strict=True):
            if p.grad is not None:
                master.grad = p.grad.float() if master.grad is None else master.grad + p.grad.float()
                p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for master, p in zip(self.params, self.model_params, strict=True):
            p.copy_(master)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): p.detach() for i, p in enumerate(self.params)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, p in enumerate(self.params):
            p.copy_(state[str(i)])
        self.master_to_model()
