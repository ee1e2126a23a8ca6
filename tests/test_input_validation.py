"""Bad input is refused before any work (no model load for a bad path, no evaluation, no hub traffic)."""

import json
import time

import pytest

from treerpo.config import ConfigError, make_config, parse_args
from treerpo.data.math_datasets import DatasetFormatError
from treerpo.models.source import ModelSourceError
from treerpo.sampling.prompt_rules import PromptTooLongError, UnrepresentablePromptError
from treerpo.training.trainer import Trainer

GSM8K_LINE = json.dumps({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}) + "\n"


def trainer(tmp_path, **overrides):
    """A Trainer whose opening evaluation would fail the test: refusals must come before it."""
    config = make_config({"output_dir": str(tmp_path / "out"), "max_steps": 1, "eval_size": 4, **overrides})
    t = Trainer(config, log=lambda *a: None)
    t.close()
    return t


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr:\nmax_steps: 3\n", r"c.yaml: \['lr'\] have no value"),
        ("algo: [grpo\n", r"config file .*c.yaml is not valid YAML"),
        ("branching: [4.7, 2]\n", r"branching=4.7 is not a valid list of int"),
        ("max_steps: true\n", r"max_steps=True is not a valid int"),
        ("seed: 1.5\n", r"seed=1.5 is not a valid int"),
        ("lr: yes\n", r"lr=True is not a valid float"),
        ("- 1\n- 2\n", r"must hold a mapping of option names to values, got list"),
    ],
)
def test_yaml_config_refusals_name_file_and_key(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(tmp_path / "c.yaml")])


def test_malformed_json_config_is_named(tmp_path):
    (tmp_path / "c.json").write_text('{"lr": 0.1,}')
    with pytest.raises(ConfigError, match=r"c.json is not valid JSON"):
        parse_args(["--config", str(tmp_path / "c.json")])


def test_exact_values_still_convert():
    config = make_config(
        {"max_steps": 4.0, "branching": ["2", 3], "lr": "1e-4", "truncate_prompts": "yes", "threads": None}
    )
    assert config.max_steps == 4 and config.branching == [2, 3] and config.lr == 1e-4 and config.truncate_prompts


def test_negative_seed_is_refused():
    with pytest.raises(ConfigError, match="seed must be >= 0, got -5"):
        make_config({"seed": -5})


def test_missing_absolute_model_folder(tmp_path):
    with pytest.raises(ModelSourceError, match=r"model folder .*/abs/missing does not exist"):
        trainer(tmp_path, model=str(tmp_path / "abs" / "missing"))


def test_relative_name_is_not_sent_to_the_hub_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    with pytest.raises(ModelSourceError, match=r"not in the local Hugging Face cache; pass --allow-download"):
        trainer(tmp_path, model="rel/missing")
    assert time.monotonic() - started < 20, "no hub retries"


def test_empty_model_folder_is_incomplete(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match=r"incomplete: no config.json, no weights"):
        trainer(tmp_path, model=str(tmp_path / "empty"))


def test_binary_dataset_names_the_file(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DatasetFormatError, match=r"data.jsonl: not UTF-8 text"):
        trainer(tmp_path, dataset=str(data))


def test_empty_training_file_and_empty_eval_file(tmp_path):
    empty, good = tmp_path / "empty.jsonl", tmp_path / "good.jsonl"
    empty.write_text("")
    good.write_text(GSM8K_LINE * 3)
    with pytest.raises(DatasetFormatError, match=r"empty.jsonl: holds no problems"):
        trainer(tmp_path, dataset=str(empty), eval_dataset=str(good))
    with pytest.raises(DatasetFormatError, match=r"empty.jsonl: holds no problems"):
        trainer(tmp_path, dataset=str(good), eval_dataset=str(empty))


def test_math_file_the_tiny_tokenizer_cannot_represent(tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text(GSM8K_LINE * 3)
    with pytest.raises(UnrepresentablePromptError, match=r"characters the model's tokenizer cannot represent"):
        trainer(tmp_path, dataset=str(data), eval_dataset=str(data), truncate_prompts=True)


def test_over_long_prompt_and_tree_too_big_for_the_pool_before_evaluation(tmp_path):
    """Refused by the constructor, so before train() runs the opening evaluation (they used to be found by the
    sampler, after it)."""
    with pytest.raises(PromptTooLongError, match=r"dataset .synthetic.: prompt \d+ has \d+ tokens but at most 8 fit"):
        trainer(tmp_path, max_prompt_tokens=8)
    with pytest.raises(PromptTooLongError, match=r"leaves no room for a prompt in the model's context of 128"):
        trainer(tmp_path, segment_tokens=64, branching=[2, 2])
    with pytest.raises(ConfigError, match=r"one tree may need \d+ KV slots .* kv_pool_tokens=100"):
        trainer(tmp_path, kv_pool_tokens=100)


@pytest.mark.parametrize("sampler_name", ["engine", "reference"])
def test_infos_of_another_length_are_refused_before_sampling(sampler_name, monkeypatch):
    from treerpo.engine.tree_sampler import TreeSampler
    from treerpo.models.tiny import load_model_and_tokenizer
    from treerpo.sampling import reference_sampler
    from treerpo.tree import TreeSpec

    model, tok = load_model_and_tokenizer()
    forwards = []  # any forward or generation would be recorded
    if sampler_name == "engine":
        sampler = TreeSampler(model, tok, pool_tokens=1024)
        monkeypatch.setattr(sampler.runner, "run", lambda *a, **k: forwards.append(1))
    else:
        sampler = reference_sampler.ReferenceTreeSampler(model, tok)
        monkeypatch.setattr(reference_sampler, "continue_sequences", lambda *a, **k: forwards.append(1))
    with pytest.raises(ValueError, match=r"1 infos for 2 prompts; give one dict per prompt"):
        sampler.sample([tok("1+2=")["input_ids"]] * 2, TreeSpec((2,), 4), infos=[{}])
    assert not forwards


def test_a_mode_chosen_from_the_launch_says_so():
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    with pytest.raises(ConfigError, match=r"--parallel ddp \(chosen for the torchrun launch of 2 processes\) needs"):
        make_config({"sampler": "reference"}).validate_launch(environ=torchrun)
