"""A ~1M-parameter Qwen2 and a character-level tokenizer, both built in code (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# The checkpoint made by `python -m treerpo.models.warmup` and shipped with the package.
DEFAULT_MODEL_DIR = Path(__file__).parent / "tiny_chain"
ADAPTER_CONFIG = "adapter_config.json"  # models.source: a LoRA adapter saved by PEFT

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHARACTERS = list("0123456789+-*=;# ")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; saves and loads like any Hugging Face fast tokenizer."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=128,
    )


def tiny_model_config(vocab_size: int, pad_token_id: int, eos_token_id: int) -> Qwen2Config:
    """Hidden 192, 3 layers, 4 query heads over 2 KV heads (GQA), tied embeddings: about 1.1M parameters."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        rope_theta=10000.0,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    vocab_size = 8 * ((len(tokenizer) + 7) // 8)
    config = tiny_model_config(vocab_size, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return Qwen2ForCausalLM(config)


def load_model_and_tokenizer(
    name_or_path: str | Path | None = None, dtype: torch.dtype = torch.float32, allow_download: bool = False
):
    """Load a causal LM and its tokenizer from a local folder, the local hub cache, or (``allow_download``) the hub.

    ``None`` means the embedded default checkpoint.
    """
    from treerpo.models.source import is_adapter_folder, resolve_model_source

    if name_or_path is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded default model is missing at {DEFAULT_MODEL_DIR}; rebuild it with "
                "`python -m treerpo.models.warmup`"
            )
        source, local_only = str(DEFAULT_MODEL_DIR), True
    else:
        source, local_only = resolve_model_source(str(name_or_path), allow_download)
        if is_adapter_folder(Path(source)):
            return load_adapter_checkpoint(Path(source), dtype, allow_download)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    except OSError as err:  # e.g. a hub name whose config is cached but not its weights
        from treerpo.models.source import ModelSourceError

        raise ModelSourceError(
            f"model {name_or_path}: could not be loaded ({err}); check the folder, or pass "
            "--allow-download to fetch what is missing from the hub"
        ) from None
    return model, _padded_left(tokenizer)


def _padded_left(tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_adapter_checkpoint(folder: Path, dtype: torch.dtype, allow_download: bool = False):
    """A LoRA checkpoint: its base model (``base_model_name_or_path`` of adapter_config.json) with the adapter
    merged into the weights, and the checkpoint's tokenizer."""
    import json

    try:
        from peft import PeftModel
    except ImportError:
        raise ImportError(f"{folder} is a LoRA adapter; loading it needs PEFT: pip install treerpo[peft]") from None
    base_name = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_name:
        raise FileNotFoundError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path to apply it to")
    base, _ = load_model_and_tokenizer(base_name, dtype=dtype, allow_download=allow_download)
    model = PeftModel.from_pretrained(base, folder).merge_and_unload()
    return model, _padded_left(AutoTokenizer.from_pretrained(folder, local_files_only=True))
