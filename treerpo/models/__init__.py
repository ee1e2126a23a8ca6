"""The embedded default model: a tiny Qwen2 with a character tokenizer made in code."""

from treerpo.models.tiny import (
    DEFAULT_MODEL_DIR,
    build_char_tokenizer,
    build_tiny_model,
    load_model_and_tokenizer,
    tiny_model_config,
)

__all__ = [
    "DEFAULT_MODEL_DIR",
    "build_char_tokenizer",
    "build_tiny_model",
    "load_model_and_tokenizer",
    "tiny_model_config",
]
