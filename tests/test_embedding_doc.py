"""docs/embedding.md's row-based example runs as written, and its row loss equals the packed tree loss."""

import re
from pathlib import Path

import pytest
import torch

from helpers import python_block

DOC = Path(__file__).resolve().parents[1] / "docs" / "embedding.md"


def example_code() -> str:
    return python_block(DOC, "## 2. A trainer that works on (prompt, completion) rows")


def test_row_example_reproduces_the_packed_loss(capsys):
    namespace: dict = {}
    exec(compile(example_code(), str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out
    row, packed = map(float, re.search(r"row loss (\S+), packed loss (\S+)", printed).groups())
    assert abs(namespace["row_loss"].item() - namespace["packed_loss"].item()) < 1e-5
    assert abs(row - packed) < 2e-6 and namespace["flat"].loss_tokens > 0
    params = [p for p in namespace["model"].parameters() if p.requires_grad]
    row_grads = torch.autograd.grad(namespace["row_loss"], params, allow_unused=True)
    packed_grads = torch.autograd.grad(namespace["packed_loss"], params, allow_unused=True)
    scale = max(g.abs().max().item() for g in packed_grads if g is not None)
    assert scale > 1e-4  # at ratio 1 the loss value is ~0; its gradient is the policy gradient
    for row_grad, packed_grad in zip(row_grads, packed_grads, strict=True):
        assert torch.allclose(row_grad, packed_grad, atol=1e-5 * scale, rtol=1e-4)
    assert len(namespace["flat"]) > len(namespace["trees"])  # several rows per tree


def trl_examples() -> list[str]:
    section = DOC.read_text().split("## 3. TRL", 1)[1].split("\n## 4.", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("index", [0, 1], ids=["grpo_trainer_with_treerpo_rollout", "treerpo_trainer"])
def test_trl_examples_run_as_written_on_the_cpu(index, tmp_path, monkeypatch):
    """Each TRL example is complete: it runs as written (in a fresh folder) and trains."""
    from treerpo import load_model_and_tokenizer

    examples = trl_examples()
    assert len(examples) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(examples[index], f"{DOC} (TRL example {index + 1})", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2
    before = load_model_and_tokenizer()[0].state_dict()
    after = namespace["model"].state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-5  # a real update
