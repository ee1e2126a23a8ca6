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
    assert all(r["max_abs_err"] < 1e-4 for r in result["results"] if result["dtype"] == "torch.float32")
