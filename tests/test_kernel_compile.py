"""Every kernel launch production makes, compiled ahead of time for sm_90 (H100) and sm_80 (A100) on this
CPU: no register spill, shared memory within the target's limit, Hopper's ``warp_group_dot`` where a
64-row tile should take it, and no warp group repeating another's product (``treerpo.kernels.aot``).

The interpreter tests check what the kernels compute; this checks what a GPU would be given, which the
interpreter never sees (it accepts code the compiler refuses, and has no registers to spill). It runs in a
fresh process without ``TRITON_INTERPRET`` (the interpreter patches ``triton.language`` in this one).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _compile_all(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "launches.json"
    run = subprocess.run(
        [sys.executable, "-m", "treerpo.kernels.aot", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if not out.exists():
        if "ptxas" in run.stderr or "cuobjdump" in run.stderr or "No such file" in run.stderr:
            pytest.skip(f"this Triton build cannot compile for CUDA here: {run.stderr.strip().splitlines()[-1]}")
        raise AssertionError(f"the compile run failed (exit {run.returncode}):\n{run.stdout}\n{run.stderr}")
    return {"rc": run.returncode, "stdout": run.stdout, **json.loads(out.read_text())}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile_all(tmp_path_factory.mktemp("aot"))


def test_every_production_launch_compiles_clean(compiled):
    bad = [
        f"{r['config']} (groups {r['groups']}): {'; '.join(r['problems'])}"
        for r in compiled["launches"]
        if r["problems"]
    ]
    assert not bad, "launches with problems:\n" + "\n".join(bad)
    assert compiled["rc"] == 0, compiled["stdout"]


def test_the_matrix_is_covered(compiled):
    """Each kernel at each target, dtype and head dim (the fused norm at each hidden size); the Hopper tree kernels on
    wgmma."""
    seen = {(r["kernel"], r["arch"], r["dtype"], r["head_dim"]) for r in compiled["launches"]}
    kernels = {
        "_tree_attn_fwd", "_tree_attn_bwd_dkdv", "_tree_attn_bwd_dq", "_tree_attn_bwd_delta",
        "_paged_attn_fwd", "_merge_states", "_rope_fwd",
    }  # fmt: skip
    for kernel in kernels:
        for head_dim in (64, 96, 128):
            assert (kernel, 90, "bf16", head_dim) in seen and (kernel, 90, "fp16", head_dim) in seen
            assert (kernel, 80, "bf16", head_dim) in seen
    assert sum(r["kernel"] == "_draw_fwd" and r["arch"] == 90 for r in compiled["launches"]) == 20
    for hidden in (576, 1536, 3584, 4096, 8192):
        assert ("_rms_norm_fwd", 90, "fp16", hidden) in seen and ("_rms_norm_fwd", 80, "bf16", hidden) in seen
    for r in compiled["launches"]:
        if r["arch"] == 90 and r["kernel"] in ("_tree_attn_fwd", "_tree_attn_bwd_dkdv", "_tree_attn_bwd_dq"):
            assert r["wgmma"], r["config"]
        no_shared = ("_merge_states", "_tree_attn_bwd_delta", "_rope_fwd")  # no reduction across warps
        assert r["stack"] == 0 and (r["shared"] > 0 or r["kernel"] in no_shared)
    groups = {g for r in compiled["launches"] for g in r["groups"]}
    assert {1, 4, 6, 7} <= groups
