"""Commands launched from the repository root, as users launch them, in this environment.

The root comes first on ``sys.path`` there (``python -m ...``, ``python -m pytest``, a worker given
``PYTHONPATH=<root>``), so a package of the project's named like an installed one would shadow it: the
project's top-level ``kernels/`` folder must never hide Hugging Face's ``kernels``, which transformers
imports at start-up.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


def run_from_root(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_ok(run):
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]


def test_the_kernels_folder_is_a_namespace_folder():
    """A regular package (an ``__init__.py``) at the root would win over any installed ``kernels``."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "treerpo" / "kernels").resolve() == (ROOT / "kernels").resolve()


@pytest.mark.parametrize("pythonpath", [None, str(ROOT)], ids=["cwd", "PYTHONPATH"])
def test_import_kernels_from_the_root_gives_the_installed_package(pythonpath):
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no package named kernels is installed here, so nothing can be shadowed")
    script = (
        "import kernels, os, sys\n"
        "assert kernels.__file__ is not None, 'the repository folder was imported as kernels'\n"
        "assert not os.path.realpath(kernels.__file__).startswith(sys.argv[1] + '/kernels/'), kernels.__file__\n"
        "import transformers.modeling_utils, treerpo.kernels.tree_attention, treerpo.train, treerpo.evaluate\n"
        "assert os.path.realpath(treerpo.kernels.tree_attention.__file__).startswith(sys.argv[1] + os.sep)\n"
    )
    env = {"PYTHONPATH": pythonpath} if pythonpath else None
    assert_ok(run_from_root("-c", script, str(ROOT.resolve()), env=env))


@pytest.mark.parametrize("module", ["treerpo.train", "treerpo.evaluate", "treerpo.plan"])
def test_the_main_jobs_start_from_the_root(module):
    run = run_from_root("-m", module, "--help")
    assert_ok(run)
    assert run.stdout.startswith(f"usage: python -m {module}")


def test_the_suite_collects_from_the_root():
    run = run_from_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert_ok(run)
    assert " tests collected" in run.stdout and "error" not in run.stdout.splitlines()[-1]


@pytest.mark.parametrize("script", BENCHMARKS)
def test_each_benchmark_starts_from_the_root(script):
    assert_ok(run_from_root(f"benchmarks/{script}", "--help", env={"PYTHONPATH": str(ROOT)}))
