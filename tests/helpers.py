"""Shared builders for tests: random trees and tiny random models."""
from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from treerpo.attention import enable_tree_attention
from treerpo.tree import Tree


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, rel: float, floor: float = 0.0, msg=None):
    """``|actual - expected| <= rel * max|expected| + floor`` everywhere: a tolerance scaled to the whole tensor,
    so that elements near zero (where an element-wise ``rtol`` means nothing) cannot turn a sound result red."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale + floor, msg=msg)


def python_block(path, heading: str) -> str:
    """The first ```python block after ``heading`` in a markdown file (the docs' examples run as tests)."""
    import re
    from pathlib import Path

    section = Path(path).read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def random_tree(rng: np.random.Generator, num_nodes: int, vocab: int = 40, prompt_len: int | None = None,
                max_segment: int = 5, shape: str = "random") -> Tree:
    """A tree of ``num_nodes`` generated nodes; ``shape`` is random, chain or fan (all children of the root)."""
    parents = []
    for n in range(1, num_nodes + 1):
        parents.append({"chain": n - 1, "fan": 0}.get(shape, int(rng.integers(0, n))))
    prompt = rng.integers(3, vocab, size=prompt_len or int(rng.integers(1, 6)))
    segments = [rng.integers(3, vocab, size=int(rng.integers(1, max_segment + 1))) for _ in parents]
    tree = Tree.from_segments(prompt, parents, segments, finished=[False] * len(parents))
    tree.kept = rng.random(tree.num_nodes) < 0.8
    tree.kept[0] = False
    tree.advantage = rng.normal(size=tree.num_nodes)
    return tree


def tiny_model(arch: str = "qwen2", vocab: int = 40, seed: int = 0, tree_attention: bool = True):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = (Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)) if arch == "qwen2"
             else LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)))
    model.eval()
    return enable_tree_attention(model) if tree_attention else model


def char_model_folder(folder, extra_chars: str = "", max_positions: int = 256):
    """A tiny random Qwen2 saved with a character tokenizer over printable ASCII plus ``extra_chars``, so that
    natural-language math prompts are representable."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set([chr(c) for c in range(32, 127)] + ["\n"] + list(extra_chars)))
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=max_positions, eos_token_id=1, pad_token_id=0))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
