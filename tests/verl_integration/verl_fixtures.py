"""What a verl CPU run needs, made in a folder: a tiny Llama-type model with treerpo's character tokenizer (and a
chat template), a parquet of prompts, and a reward function."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from treerpo.models.tiny import build_char_tokenizer

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """1 when the answer's first character has an even code (about half of a random model's answers), so sibling
    groups disagree and the trees carry a signal."""
    return float(ord((solution_str or "a")[0]) % 2 == 0)
'''


def tiny_llama(folder: Path, seed: int = 0) -> Path:
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    vocab = 8 * ((len(tokenizer) + 7) // 8)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompts_parquet(path: Path, count: int = 8) -> Path:
    rows = []
    for i in range(count):
        a, b = i % 5, (3 * i) % 4
        rows.append(
            {
                "data_source": "tiny_sums",
                "prompt": [{"role": "user", "content": f"{a}+{b}"}],
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"index": i},
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def reward_file(path: Path) -> Path:
    path.write_text(REWARD)
    return path


if __name__ == "__main__":
    import sys

    root = Path(sys.argv[1])
    tiny_llama(root / "model")
    prompts_parquet(root / "train.parquet")
    prompts_parquet(root / "val.parquet", 4)
    reward_file(root / "reward.py")
    print(json.dumps({"root": str(root)}))
