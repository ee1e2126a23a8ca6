"""benchmarks/attention.py runs end to end at toy size and writes its headline ratios."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_attention_benchmark_quick_writes_ratios(tmp_path):
    out = tmp_path / "a.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--quick", "--json", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    ratios = result["ratios"]
    for key in ("sdpa_tree_fwd_speedup_vs_independent_rows", "flex_over_sdpa_fwd", "row_tokens_over_tree_tokens"):
        assert ratios[key] > 0
    assert ratios["row_tokens_over_tree_tokens"] > 1
    systems = {r["system"] for r in result["results"]}
    assert {"flex", "sdpa_tree", "paths", "rows_causal"} <= systems
    assert result["complete"] and all(r["status"] == "ok" for r in result["results"])
    assert all(r["rel_err"] < 1e-4 for r in result["results"] if result["dtype"] == "torch.float32")


def test_a_wrong_or_failing_system_is_reported_and_left_out(tmp_path, monkeypatch):
    """A system off the fp32 reference is "wrong" (kept out of the ratios, exit 1); one that raises is an
    "error" and the others still run; the JSON is written as the run goes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import attention

    monkeypatch.setattr(attention, "sdpa_tree_attention", lambda q, k, v, tin, tout, scale=None, cache=None: q * 1.5)
    real_get = attention.get_tree_backend

    def get(name):
        if name != "flex":
            return real_get(name)

        def broken(*args, **kwargs):
            raise RuntimeError("no kernel for this shape")

        return broken

    monkeypatch.setattr(attention, "get_tree_backend", get)
    out = tmp_path / "a.json"
    rc = attention.main(["--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    status = {r["system"]: r["status"] for r in result["results"]}
    assert rc == 1 and status["sdpa_tree"].startswith("wrong: relative error")
    assert status["flex"] == "error: RuntimeError: no kernel for this shape"
    assert status["paths"] == status["rows_causal"] == "ok"
    assert not any("sdpa_tree" in k or "flex" in k for k in result["ratios"])
    assert "paths_fwdbwd_speedup_vs_independent_rows" in result["ratios"]
