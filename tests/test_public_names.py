"""The public names of ``treerpo``: every one imports, the TRL names included, and a missing optional dependency
names the extra that brings it."""

import subprocess
import sys

import treerpo
from treerpo.integrations import trl as trl_integration


def test_every_public_name_imports():
    for name in treerpo.__all__:
        assert getattr(treerpo, name) is not None, name


def test_the_trl_names_are_all_public():
    assert set(trl_integration.__all__) <= set(treerpo.__all__)
    assert treerpo.UnsupportedTRLOption is trl_integration.UnsupportedTRLOption


def test_a_trl_name_without_trl_names_the_extra():
    script = (
        "import sys\n"
        "sys.modules['trl'] = None  # as if TRL were not installed\n"
        "try:\n"
        "    from treerpo import TreeRPOTrainer\n"
        "except ImportError as err:\n"
        "    assert 'pip install treerpo[trl]' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('imported without trl')\n"
        "from treerpo import TreeSpec, pack_trees  # the rest of the package does not need TRL\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
