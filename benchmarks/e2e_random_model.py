"""A Qwen2-1.5B-shaped model with random weights and a 151,936-token word-level tokenizer, for GPU throughput.

Made once into a local folder (bf16 safetensors, ~3 GB) so that every system loads the same weights from
a path (TRL loads its reference model from the policy's path). Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

VOCAB = 151_936


def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from treerpo.models.tiny import CHARACTERS, SPECIAL_TOKENS

    words = SPECIAL_TOKENS + CHARACTERS
    vocab = {w: i for i, w in enumerate(words + [f"<t{i}>" for i in range(len(words), VOCAB)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=4096,
    )


def random_qwen2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cache = Path(cache_dir or os.environ.get("TREERPO_CACHE", Path.home() / ".cache" / "treerpo"))
    target = cache / "random-qwen2-1.5b"
    if (target / "config.json").exists():
        return target
    tokenizer = _tokenizer()
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=1e6,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    tmp = cache / ".random-qwen2-1.5b.tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target
