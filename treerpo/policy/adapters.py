"""LoRA adapters (PEFT) on the policy.

``add_lora`` injects the adapter's layers into the model in place and freezes the base weights; the Hugging Face
model itself (``base_of``) then computes the adapted policy, so every treerpo forward (the engine's decode, the
packed log-probs, evaluation) runs on it unchanged, with the adapter applied, not merged. The reference policy is
the same model with the adapter disabled (``adapter_disabled``): no second copy of the weights.
"""

from __future__ import annotations

import contextlib

ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer of the decoder but the LM head


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs PEFT: pip install treerpo[peft]") from None
    return peft


def add_lora(model, rank: int, alpha: float, targets: list[str]):
    """The PeftModel around ``model`` (changed in place) with a LoRA adapter of ``rank`` on ``targets``."""
    peft = require_peft()
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=ALL_LINEAR if list(targets) == [ALL_LINEAR] else list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def base_of(model):
    """The Hugging Face model under a PeftModel (its adapter layers applied in its forward), or ``model``."""
    return model.get_base_model() if is_peft_model(model) else model


@contextlib.contextmanager
def adapter_disabled(peft_model):
    with peft_model.disable_adapter():
        yield
