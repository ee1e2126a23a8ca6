"""``python -m treerpo.plan``: sizes against hand-counted parameters, per-rank state against its arithmetic, the
estimate against the measured peak of a training update, and its refusals and advice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from treerpo.config import ConfigError, make_config
from treerpo.memory.model_shape import model_shape
from treerpo.plan import make_plan, ways_to_fit

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "benchmarks" / "model_configs"
GIB = 1 << 30


def qwen2_parameters(c: dict) -> int:
    """Hand count of a Qwen2 decoder: q/k/v with biases, o without, a gated MLP, two norms a layer, a final norm."""
    h, i, kv = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"],
    )
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    embeddings = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return c["num_hidden_layers"] * layer + embeddings + h


@pytest.mark.parametrize("name", ["qwen2.5-math-1.5b.json", "qwen2.5-7b.json"])
def test_model_shape_counts_the_parameters_of_a_config_without_weights(name):
    config = json.loads((CONFIGS / name).read_text())
    shape = model_shape(str(CONFIGS / name))
    assert shape.parameters == qwen2_parameters(config)
    assert shape.layers == config["num_hidden_layers"] and shape.tied_embeddings == config["tie_word_embeddings"]
    assert shape.root_parameters + shape.layers * shape.layer_parameters == shape.parameters


def test_fsdp_shards_the_fp32_state_and_ddp_replicates_it():
    model = str(CONFIGS / "qwen2.5-math-1.5b.json")
    options = {"model": model, "dtype": "bfloat16", "prompts_per_step": 64, "kl_coef": 0.0}
    fsdp = make_plan(make_config({**options, "parallel": "fsdp"}), world_size=8)
    ddp = make_plan(make_config({**options, "parallel": "ddp"}), world_size=8)
    p = fsdp.shape.parameters
    for plan, ranks in ((fsdp, 8), (ddp, 1)):
        fp32 = sum(v for k, v in plan.state.items() if k.startswith(("parameters", "gradients", "AdamW")))
        assert fp32 == pytest.approx(16 * p / ranks, rel=1e-6)  # masters, gradients, two moments: 4 x 4 bytes
    # sampling gathers every layer in bf16 under either: the full model's weights in the rollout's working set
    assert fsdp.phases["rollout"] >= 2 * p and ddp.phases["rollout"] >= 2 * p


def plan_command(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "treerpo.plan", *flags], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_a_7b_model_on_one_80gb_gpu_does_not_fit_and_each_advised_change_does():
    model = str(CONFIGS / "qwen2.5-7b.json")
    config = make_config({"model": model, "dtype": "bfloat16"})
    plan = make_plan(config)
    assert plan.total > 80 * GIB  # 16 bytes a parameter of fp32 state alone is 113 GiB
    advice = ways_to_fit(config, plan, 80 * GIB)
    assert any(a.startswith("--parallel fsdp on") for a in advice)
    ranks = int(next(a for a in advice if a.startswith("--parallel fsdp on")).split()[3])
    assert make_plan(make_config({"model": model, "dtype": "bfloat16", "parallel": "fsdp"}), ranks).total <= 80 * GIB
    assert make_plan(make_config({"model": model, "dtype": "bfloat16", "parallel": "fsdp"}), ranks // 2).total > (
        80 * GIB
    ), "the advice is the fewest ranks that fit"


def test_command_line_prints_the_plan_and_exits_by_fit(tmp_path):
    model = str(CONFIGS / "qwen2.5-math-1.5b.json")
    fits = plan_command("--model", model, "--dtype", "bfloat16", "--json", str(tmp_path / "p.json"))
    assert fits.returncode == 0, fits.stderr
    assert "peak per rank" in fits.stdout and "fits" in fits.stdout
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["fits"] and record["peak_bytes"] == sum(record["state_bytes"].values()) + max(
        record["phase_bytes"].values()
    )
    tight = plan_command("--model", model, "--dtype", "bfloat16", "--device-memory-gib", "16")
    assert tight.returncode == 3 and "does NOT fit" in tight.stdout and "fits with:" in tight.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--world-size", "2", "--parallel", "none"), "pass --parallel ddp or fsdp"),
        (("--world-size", "64", "--prompts-per-step", "8"), "smaller than --world-size"),
        (("--model", "/nonexistent/model"), "no config.json"),
    ],
)
def test_bad_input_is_refused_with_the_fix(flags, message):
    done = plan_command(*flags)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_run_shape_refuses_world_size_zero():
    with pytest.raises(ConfigError, match="world-size must be >= 1"):
        make_plan(make_config({}), world_size=0)


def test_live_bytes_counts_the_peak_of_live_storages():
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from live_bytes import LiveBytes

    held = torch.zeros(1000)  # 4000 bytes, there before
    live = LiveBytes()
    live.keep([held, held[10:]])  # a view shares its storage: counted once
    with live:
        a = torch.ones(250)
        b = a * 2  # 4000 + 1000 + 1000
        del a
        c = torch.empty(500)  # 4000 + 1000 + 2000
    assert (live.peak, live.current) == (7000, 7000)
    del b, c
    assert live.current == 4000
