"""The sizes a memory plan needs, read from a model's config and a parameter count on the meta device (no weights
are read or allocated)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ModelShape:
    name: str
    parameters: int  # distinct parameters (tied embeddings once)
    layer_parameters: int  # the largest decoder layer (an FSDP2 unit)
    root_parameters: int  # the rest: embeddings, final norm, LM head (the FSDP2 root unit)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    dtype: str  # the checkpoint's own (what --dtype left out loads on CUDA)


def load_config(model: str | None):
    """A Hugging Face config from a config.json file, a folder holding one, ``smollm2``, or None (the embedded tiny
    model); the hub is never asked."""
    from transformers import AutoConfig

    if model is None:
        from treerpo.models.tiny import DEFAULT_MODEL_DIR

        return AutoConfig.from_pretrained(DEFAULT_MODEL_DIR)
    if model == "smollm2":
        from treerpo.models.smollm2 import smollm2_dir

        return AutoConfig.from_pretrained(smollm2_dir())
    path = Path(model).expanduser()
    if path.is_file():
        values = json.loads(path.read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    raise FileNotFoundError(
        f"model {model!r}: no config.json there; give a model folder, its config.json, smollm2, or leave --model out"
    )


def model_shape(model: str | None) -> ModelShape:
    from transformers import AutoModelForCausalLM

    config = load_config(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    from treerpo.policy.parallel import decoder_layers

    layers = decoder_layers(meta)
    total = sum(p.numel() for p in meta.parameters())
    in_layers = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    heads = text.num_attention_heads
    return ModelShape(
        name=str(model or "embedded tiny"),
        parameters=total,
        layer_parameters=max(in_layers),
        root_parameters=total - sum(in_layers),
        layers=len(layers),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        tied_embeddings=meta.get_output_embeddings() is None
        or meta.get_output_embeddings().weight is meta.get_input_embeddings().weight,
        dtype=str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").removeprefix(
            "torch."
        ),
    )
