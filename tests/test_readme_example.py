"""The README's embedding example runs as written and actually trains (the weights change)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def example_code() -> str:
    section = README.read_text().split("## Use it in your own RL loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(capsys):
    namespace: dict = {}
    exec(compile(example_code(), str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.count("step ") == 2
    model = namespace["model"]
    from treerpo import load_model_and_tokenizer

    original, _ = load_model_and_tokenizer()
    changed = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values())]
    assert any(changed), "two optimizer steps on trees with kept groups must change the weights"
