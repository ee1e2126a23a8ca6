"""One registry for the tree and paged attention backends; the Triton kernels are plain tensor operations that know
nothing of it (nor of anything else in ``treerpo``)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from treerpo.attention import paged, registry
from treerpo.engine import model_runner

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def treerpo_imports(path: Path) -> list[str]:
    """What a module imports from ``treerpo``: absolute imports, relative ones climbing above ``kernels``
    (installed as ``treerpo.kernels``), and ``import_module``/``__import__`` of a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "treerpo"]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1 or (node.level == 0 and (node.module or "").split(".")[0] == "treerpo"):
                found.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).split(".")[0] == "treerpo"
            ):
                found.append(node.args[0].value)
    return found


def test_the_finder_sees_treerpo_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import os\nfrom ._common import x\nfrom treerpo.trees.tile_skip import tile_skip\n"
        "import treerpo.trees.packing\n"
        "from ..attention import paged\nimportlib.import_module('treerpo.attention')\n"
    )
    assert treerpo_imports(src) == [
        "treerpo.trees.tile_skip",
        "treerpo.trees.packing",
        "..attention",
        "treerpo.attention",
    ]


def test_kernels_import_nothing_from_treerpo():
    files = sorted(KERNELS.glob("*.py"))
    assert {"tree_attention.py", "paged_decode.py"} <= {f.name for f in files}
    assert {f.name: treerpo_imports(f) for f in files} == {f.name: [] for f in files}


def test_importing_a_kernel_registers_nothing():
    """Registration is ``treerpo.attention``'s (lazily, for CUDA), not a side effect of a kernel's import."""
    pytest.importorskip("triton")
    script = (
        "import treerpo.kernels.paged_decode, treerpo.kernels.tree_attention\n"
        "from treerpo.attention import registry\n"
        "print(registry.available_tree_backends(), registry.available_paged_backends())\n"
        "assert 'triton' not in registry.available_tree_backends()\n"
        "assert registry.available_paged_backends() == ['torch']\n"
        "assert registry._register_triton('tree') and registry._register_triton('paged')\n"
        "from treerpo.attention import triton_backends\n"
        "assert registry.get_tree_backend('triton') is triton_backends.triton_tree_backend\n"
        "assert registry.get_paged_backend('triton') is triton_backends.paged_decode_backend\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    "kind,get,available",
    [
        ("tree", registry.get_tree_backend, registry.available_tree_backends),
        ("paged", registry.get_paged_backend, registry.available_paged_backends),
    ],
)
def test_unknown_backend_error_names_the_available_ones(kind, get, available):
    names = available()
    assert names and names == registry.available_backends(kind)
    for lookup in (lambda: get("nope"), lambda: registry.get_backend(kind, "nope")):
        with pytest.raises(ValueError) as err:
            lookup()
        message = str(err.value)
        assert f"unknown {kind} attention backend 'nope'" in message
        assert f"available: {names}" in message
    with pytest.raises(ValueError, match=r"unknown attention backend kind 'dense'; kinds: \['paged', 'tree'\]"):
        registry.get_backend("dense", "sdpa")


def test_one_registry_for_both_kinds(monkeypatch):
    monkeypatch.setitem(registry._BACKENDS["paged"], "mine", None)  # restored after the test
    monkeypatch.setitem(registry._BACKENDS["tree"], "mine", None)

    def paged_fn(*args):
        return "paged"

    def tree_fn(*args, **kwargs):
        return "tree"

    registry.register_paged_backend("mine", paged_fn)
    registry.register_backend("tree", "mine", tree_fn)
    assert registry.get_backend("paged", "mine") is paged_fn and registry.get_paged_backend("mine") is paged_fn
    assert registry.get_tree_backend("mine") is tree_fn
    assert "mine" in registry.available_tree_backends() and "mine" in registry.available_paged_backends()
    assert registry.get_paged_backend("torch") is paged.paged_attention_torch
    # the PyTorch paged module keeps no registry of its own
    assert not any(hasattr(paged, n) for n in ("_PAGED_BACKENDS", "register_paged_backend", "get_paged_backend"))


def test_defaults_off_cuda_and_the_runner_uses_the_registry():
    assert registry.default_tree_backend("cpu") == "paths"
    assert registry.default_paged_backend("cpu") == "torch"
    assert model_runner.default_paged_backend is registry.default_paged_backend
