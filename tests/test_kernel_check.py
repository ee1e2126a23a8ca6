"""First-use check of the Triton kernels (run here in the Triton interpreter): a kernel that disagrees with the
PyTorch reference, or fails to run, is replaced by the reference with one warning, and results equal it."""

import logging
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from helpers import random_tree, tiny_model
from treerpo.attention import kernel_check, registry
from treerpo.attention.registry import get_paged_backend, register_paged_backend
from treerpo.policy.logprobs import packed_logprobs
from treerpo.trees.packing import pack_trees

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(kernel_check, "_verdicts", {})
    monkeypatch.setattr(kernel_check, "_enabled", True)
    assert registry._register_triton("tree")
    assert registry._register_triton("paged")


def test_the_real_kernels_pass(caplog):
    with caplog.at_level(logging.WARNING):
        assert kernel_check.checked_backend("tree", "triton", CPU, torch.float32) == "triton"
        assert kernel_check.checked_backend("paged", "triton", CPU, torch.float32) == "triton"
    assert not caplog.records


def test_a_wrong_tree_kernel_falls_back_and_results_equal_the_reference(monkeypatch, caplog):
    real = registry.get_tree_backend("triton")
    monkeypatch.setitem(registry._BACKENDS["tree"], "triton", lambda *a, **k: real(*a, **k) * 1.01)
    rng = np.random.default_rng(0)
    batch = pack_trees([random_tree(rng, 6), random_tree(rng, 4)])
    model = tiny_model("qwen2")
    with caplog.at_level(logging.WARNING):
        got = packed_logprobs(model, batch, backend="triton")
        again = packed_logprobs(model, batch, backend="triton")
    warnings = [r for r in caplog.records if "first-use check" in r.getMessage()]
    assert len(warnings) == 1 and "tree attention kernel" in warnings[0].getMessage()
    assert "cpu" in warnings[0].getMessage() and "'sdpa'" in warnings[0].getMessage()
    expected = packed_logprobs(model, batch, backend="sdpa")
    assert torch.equal(got, expected) and torch.equal(again, expected)


def test_a_failing_paged_kernel_falls_back(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    real = get_paged_backend("triton")
    register_paged_backend("triton", broken)
    try:
        with caplog.at_level(logging.WARNING):
            assert kernel_check.checked_backend("paged", "triton", CPU, torch.float32) == "torch"
            assert kernel_check.checked_backend("paged", "triton", CPU, torch.float32) == "torch"
    finally:
        register_paged_backend("triton", real)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "no kernel image" in messages[0] and "'torch'" in messages[0]


def test_the_check_can_be_turned_off(monkeypatch):
    monkeypatch.setitem(registry._BACKENDS["tree"], "triton", lambda *a, **k: pytest.fail("the check ran the kernel"))
    kernel_check.set_kernel_verification(False)
    assert kernel_check.checked_backend("tree", "triton", CPU, torch.float32) == "triton"
