"""The README's embedding example runs as written and actually trains (the weights change)."""

from pathlib import Path

import torch

from helpers import python_block

README = Path(__file__).resolve().parents[1] / "README.md"


def example_code() -> str:
    return python_block(README, "## Use it in your own RL loop")


def test_readme_example_runs(capsys):
    namespace: dict = {}
    exec(compile(example_code(), str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.count("step ") == 2
    model = namespace["model"]
    from treerpo import load_model_and_tokenizer

    original, _ = load_model_and_tokenizer()
    changed = [
        not torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values(), strict=True)
    ]
    assert any(changed), "two optimizer steps on trees with kept groups must change the weights"
