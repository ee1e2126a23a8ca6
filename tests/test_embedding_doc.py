"""docs/embedding.md's row-based example runs as written, and its row loss equals the packed tree loss."""

import re
from pathlib import Path

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
