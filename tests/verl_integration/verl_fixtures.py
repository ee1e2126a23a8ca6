"""What a verl CPU run needs, made in a folder: a tiny Llama-type model with treerpo's character tokenizer (and a
chat template), a parquet of prompts, and a reward function."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from helpers import tiny_model
from treerpo.models.tiny import build_char_tokenizer

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """1 when the answer's character codes sum to an even number: about half of a random model's answers, and any
    token of a leaf's own segment can flip it, so sibling groups at every level disagree often (a reward read off
    the first character would be shared by the leaves below one branch and leave the test's signal to chance)."""
    return float(sum(map(ord, solution_str or "")) % 2 == 0)
'''


def tiny_llama(folder: Path, seed: int = 0) -> Path:
    """The tests' tiny Llama (``helpers.tiny_model``) over the character vocabulary, saved with its tokenizer."""
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = tiny_model("llama", vocab=8 * ((len(tokenizer) + 7) // 8), seed=seed, tree_attention=False)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.config, name, tokenizer.pad_token_id if name == "pad_token_id" else tokenizer.eos_token_id)
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
