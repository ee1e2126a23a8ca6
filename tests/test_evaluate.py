"""``python -m treerpo.evaluate`` reads every benchmark format and writes pass@1 per benchmark."""
import json

import pytest

from conftest import SHARED_DATA
from treerpo.data.synthetic import chain_reward
from treerpo.evaluate import main
from treerpo.evaluation import pass_at_1
from treerpo.models.tiny import load_model_and_tokenizer


def test_pass_at_1_against_a_hand_count():
    """Scores come from the reward on the model's own greedy answers, recomputed here independently."""
    model, tok = load_model_and_tokenizer()
    prompts, golds = ["12+7-15+3=", "1+1+1+1="], ["7", "4"]
    res = pass_at_1(model, tok, prompts, golds, chain_reward, max_new_tokens=40)
    recomputed = chain_reward([c[0] for c in res.completions], golds)
    assert res.accuracy == pytest.approx(sum(recomputed) / 2)
    res4 = pass_at_1(model, tok, prompts, golds, chain_reward, max_new_tokens=40, n=3, temperature=1.0)
    assert res4.scores.shape == (2, 3)
    assert res4.pass_at_n == pytest.approx(float((res4.scores.max(axis=1) > 0.5).mean()))


def test_synthetic_benchmark(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["--data", "synthetic", "--limit", "32", "--output", str(out)]) == 0
    result = json.loads(out.read_text())["benchmarks"]["synthetic"]
    assert result["problems"] == 32 and 0.0 <= result["pass@1"] <= 1.0
    assert "synthetic" in capsys.readouterr().out


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent")
def test_every_shared_file_format(tmp_path):
    files = sorted(str(p) for p in SHARED_DATA.iterdir() if p.suffix in (".jsonl", ".json"))
    out = tmp_path / "r.json"
    assert main(["--data", *files, "--limit", "2", "--max-new-tokens", "4", "--output", str(out)]) == 0
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert sorted(benchmarks) == sorted(p.rsplit("/", 1)[1].rsplit(".", 1)[0] for p in files)
    assert all(b["problems"] == 2 for b in benchmarks.values())
