"""Options: defaults < config file < flags; unknown keys and bad values are refused with the fix."""

import json

import pytest

from treerpo.config import ConfigError, make_config, parse_args


def test_flags_override_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algo: grpo\nlr: 0.001\nbranching: [2, 2]\n")
    config = parse_args(["--config", str(cfg), "--lr", "0.005", "--max-steps", "7"])
    assert config.algo == "grpo" and config.lr == 0.005 and config.max_steps == 7 and config.branching == [2, 2]


def test_json_config_and_list_flag(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"segment_tokens": 8, "truncate_prompts": True}))
    config = parse_args(["--config", str(cfg), "--branching", "8", "2"])
    assert config.segment_tokens == 8 and config.truncate_prompts is True and config.branching == [8, 2]


def test_unknown_key_lists_valid_keys(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rate'\]; valid keys: .*'lr'"):
        parse_args(["--config", str(cfg)])


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("algo", "ppo", r"algo='ppo' is not valid; choose one of \['treerpo', 'grpo'\]"),
        ("advantage_norm", "z", r"choose one of \['group_std', 'mean_only', 'batch_std'\]"),
        ("lr", "fast", r"lr='fast' is not a valid float"),
        ("max_steps", 0, r"max_steps must be >= 1"),
        ("tau", -1, r"tau must be >= 0"),
        ("global_weight", -1, r"global_weight must be a finite number >= 0, got -1.0; use 0 for local advantages"),
        ("global_weight", "nan", r"global_weight must be a finite number >= 0, got nan"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("fork_entropy", -0.5, r"fork_entropy must be a finite number of nats >= 0, got -0.5; use 0"),
        ("fork_entropy", "inf", r"fork_entropy must be a finite number of nats >= 0, got inf"),
        ("min_segment_tokens", 13, r"min_segment_tokens must be in \[1, segment_tokens=12\], got 13"),
        ("branching", [2, 0], r"branching must be a non-empty list of integers >= 1"),
        ("truncate_prompts", "maybe", r"is not a valid bool"),
        ("lr", "nan", r"lr must be a finite number"),
        ("threads", 0, r"threads must be >= 1"),
        ("tree_attention_backend", "sdpaa", r"tree_attention_backend='sdpaa' is not valid; choose one of"),
    ],
)
def test_bad_values_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        make_config({key: value})


def test_cli_reports_config_error(capsys):
    from treerpo.train import main

    assert main(["--algo", "ppo"]) == 2
    assert "choose one of ['treerpo', 'grpo']" in capsys.readouterr().err


def test_global_weight_option():
    assert make_config({}).global_weight == 0.0
    assert parse_args(["--global-weight", "0.5"]).global_weight == 0.5
    with pytest.raises(ConfigError, match=r"global_weight > 0 with advantage_norm batch_std is not supported yet"):
        make_config({"global_weight": 0.5, "advantage_norm": "batch_std", "parallel": "ddp"})
    assert make_config({"global_weight": 0.5, "advantage_norm": "batch_std"}).global_weight == 0.5


def test_resume_refuses_another_global_weight():
    from pathlib import Path

    from treerpo.runtime.resume import ResumeMismatchError, check_resumable, comparable_config

    saved = comparable_config(make_config({}))
    older = {k: v for k, v in saved.items() if k != "global_weight"}  # a checkpoint from before the option
    check_resumable(comparable_config(make_config({})), older, Path("ckpt"))
    for before in (saved, older):
        with pytest.raises(ResumeMismatchError, match=r"global_weight=0.5 \(was 0.0\)"):
            check_resumable(comparable_config(make_config({"global_weight": 0.5})), before, Path("ckpt"))


def test_a_checkpoint_from_before_parallel_was_one_process():
    """Its config has no ``parallel``: it resumes in one process (auto resolved to none), not under DDP."""
    from pathlib import Path

    from treerpo.runtime.resume import ResumeMismatchError, check_resumable, comparable_config

    older = {k: v for k, v in comparable_config(make_config({}).validate_launch(environ={})).items() if k != "parallel"}
    check_resumable(comparable_config(make_config({}).validate_launch(environ={})), older, Path("ckpt"))
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    with pytest.raises(ResumeMismatchError, match=r"parallel='ddp' \(was 'none'\)"):
        check_resumable(comparable_config(make_config({}).validate_launch(environ=torchrun)), older, Path("ckpt"))
