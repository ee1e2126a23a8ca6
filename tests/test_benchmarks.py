"""The benchmarks run end to end at toy sizes and write their headline ratios (they are measured elsewhere)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script, *args, tmp_path):
    out = tmp_path / "r.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    return json.loads(out.read_text())


def test_rollout_benchmark_writes_ratios(tmp_path):
    result = run_benchmark(
        "rollout.py", "--model", "tiny", "--prompts", "2", "--segment-tokens", "4", "--repeats", "1", tmp_path=tmp_path
    )
    ratios = result["ratios"]
    assert ratios["analytic_generated_token_ratio"] == pytest.approx(8 * 3 / 14)
    assert ratios["measured_generated_token_ratio"] == pytest.approx(ratios["analytic_generated_token_ratio"])
    systems = result["systems"]
    assert systems["engine_tree"]["leaves"] == systems["hf_generate"]["leaves"] == 16
    assert systems["engine_tree"]["forward_tokens"] < systems["engine_noshare"]["forward_tokens"]
    # the useful FLOP rate against this CPU's decode-shaped matmul limit
    assert result["matmul_limit"]["flop_per_s"] > 0 and result["matmul_limit"]["rows"] == 2 * 8
    assert result["flops_per_token"] == 2 * (result["non_embedding_params"] + result["lm_head_params"])
    for name in ("engine_tree", "engine_flat", "engine_noshare", "hf_generate"):
        assert 0 < systems[name]["matmul_limit_fraction"] < 1.5, name
        assert systems[name]["useful_tokens"] == systems[name]["generated_tokens"] + result["prompt_tokens"]
    for name in ("engine_flat", "engine_tree"):
        assert ratios[f"{name}_matmul_limit_fraction"] == systems[name]["matmul_limit_fraction"]
        assert 0 < ratios[f"{name}_matmul_limit_fraction"] < 1.5


def test_rollout_benchmark_compares_two_dtypes(tmp_path):
    result = run_benchmark(
        "rollout.py",
        *("--model", "tiny", "--prompts", "2", "--segment-tokens", "3", "--repeats", "1"),
        *("--dtype", "bf16", "--against-dtype", "fp32"),
        tmp_path=tmp_path,
    )
    comparison, ratios = result["dtype_comparison"], result["ratios"]
    assert result["dtype"] == "bfloat16"
    seconds = comparison["engine_tree_seconds"]
    assert ratios["engine_tree_bfloat16_speedup_vs_fp32"] == min(seconds["fp32"]) / min(seconds["bfloat16"])
    greedy = comparison["greedy_agreement"]
    assert greedy["of"] == 2 and ratios["greedy_identical_share"] == greedy["identical"] / 2
    assert 0 <= greedy["mean_prefix_share"] <= 1


def test_greedy_agreement_counts_identical_decodes_and_shared_prefixes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rollout import agreement

    result = agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 9, 7, 8]])
    assert result == {"identical": 1, "of": 2, "mean_prefix_share": (1.0 + 0.25) / 2}


def test_train_step_benchmark_times_both_dtypes(tmp_path):
    result = run_benchmark(
        "train_step.py",
        *("--model", "tiny", "--trees", "2", "--prompt-tokens", "5", "--branching", "2", "2"),
        *("--segment-tokens", "3", "--repeats", "2"),
        tmp_path=tmp_path,
    )
    assert result["packed_tokens"] == 2 * (5 + 6 * 3) and result["loss_tokens"] == 2 * 6 * 3
    assert len(result["seconds"]["fp32"]) == len(result["seconds"]["bf16"]) == 2
    ratios = result["ratios"]
    assert ratios["bf16_speedup_vs_fp32"] == min(result["seconds"]["fp32"]) / min(result["seconds"]["bf16"])
    assert 0 < ratios["bf16_logprob_relative_difference"] < 0.05  # bf16 rounding, not a different batch


def test_draw_benchmark_bounds_the_chunked_draw(tmp_path):
    """512 rows x 5,000 tokens in a 2 MB budget (20 rows a chunk) against every row at once: the same tokens,
    and the chunked draw's extra memory well under the 10 MB that one fp32 copy of all the logits takes."""
    result = run_benchmark(
        "draw.py",
        "--rows",
        "512",
        "--vocab",
        "5000",
        "--memory-bytes",
        str(2 * 10**6),
        "--repeats",
        "1",
        "--threads",
        "1",
        tmp_path=tmp_path,
    )
    (row,) = result["results"]
    assert row["same_tokens"]
    assert row["chunked"]["peak_extra_MiB"] < 512 * 5000 * 4 / 2**20
    ratios = result["ratios"]
    assert {"one_shot_over_chunked_seconds_512x5000", "one_shot_over_chunked_peak_512x5000"} <= set(ratios)
    # traffic a logit: the head's fp32 write and the PyTorch draw's fp64 passes (about 100 B), against the head's
    # write and the fused kernel's three reads (16 B: emulated without a GPU)
    assert 80 < ratios["chunked_bytes_per_logit_512x5000"] < 120
    assert ratios["fused_bytes_per_logit_512x5000"] == pytest.approx(16, abs=0.5)
    assert row["fused"]["emulated"] is (not torch.cuda.is_available())


def test_tree_ops_benchmark_writes_ratios(tmp_path):
    result = run_benchmark("tree_ops.py", "--quick", tmp_path=tmp_path)
    assert result["ratios"] and all(v > 0 for v in result["ratios"].values())


def _gpu_check(env: dict, timeout: int) -> subprocess.CompletedProcess:
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    return subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    """benchmarks/gpu_check.sh: without CUDA (and without GPU_CHECK_DRY_RUN=1) one line, exit 2, nothing written."""
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_DRY_RUN"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = _gpu_check(env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0]
    assert not (tmp_path / "out").exists()


def test_gpu_check_dry_run_runs_every_planned_part(tmp_path):
    """The plumbing of benchmarks/gpu_check.sh on the CPU at toy sizes: the plan within 80% of the budget,
    every planned part passing (the optional ones skipped), at most 8 result files (what comes back from a
    lent GPU machine), the correctness errors and the attention rows written."""
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, OUT=str(out))
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {p["part"]: p["status"] for p in summary["parts"]}
    planned = ["install", "correctness", "triton_kernels", "paged_cascade", "arch_bf16", "random_model"]
    assert all(status[p] == "PASS" for p in [*planned, "attention", "rollout", "draw"]), status
    assert status["e2e"] == status["kernel_check"] == status["arch_matrix"] == "SKIP"
    assert summary["planned_s"] <= 0.8 * summary["budget_s"]
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and {"correctness.json", "attention.json", "gpu_check.log"} <= set(files), files
    errors = json.loads((out / "correctness.json").read_text())["errors"]
    assert errors and max(errors.values()) < 2e-2
    assert json.loads((out / "attention.json").read_text())["complete"]


def test_gpu_check_refuses_a_plan_over_its_budget(tmp_path):
    env = dict(
        os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, OUT=str(tmp_path / "o"), GPU_CHECK_BUDGET_S="300"
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "more than 80% of GPU_CHECK_BUDGET_S=300" in proc.stdout, proc.stdout


def test_attention_traffic_counts_and_ratios(tmp_path):
    """By hand: one 64-token tile pair, one head, dim 16, 2-byte elements: the forward reads Q (2,048 B), K and V
    (4,096 B) and their intervals (512 B), writes O (2,048 B) and the LSE (256 B): 8,960 B, in both designs
    (grouped-query packing changes nothing with one head a KV head). The run at toy size writes its ratios."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import attention_traffic as t

    from treerpo.kernels.tile_configs import TileConfig, TreeTiles

    assert t.before_bytes(64, 1, 1, 16, 2, p64=1)["fwd"] == 8960
    tiles = TreeTiles(*[TileConfig(64, 64, 4, 1)] * 3)
    assert t.after_bytes(64, 1, 1, 16, 2, tiles, 1, 1, 1)["fwd"] == 8960
    result = run_benchmark("attention_traffic.py", "--tokens", "2048", tmp_path=tmp_path)
    assert result["ratios"]["bytes_before_over_after"] > 1


def test_weights_fingerprint_benchmark_writes_ratios(tmp_path):
    result = run_benchmark(
        "weights_fingerprint.py",
        "--model",
        "tiny",
        "--prompts",
        "1",
        "--branching",
        "2",
        "--segment-tokens",
        "4",
        "--repeats",
        "1",
        tmp_path=tmp_path,
    )
    assert result["parameters"] > 0 and result["fingerprint_s"] > 0 and result["rollout_s"] > 0
    assert result["ratios"]["fingerprint_over_rollout"] == result["fingerprint_s"] / result["rollout_s"]


@pytest.mark.slow
def test_memory_plan_benchmark_matches_the_measured_peak_of_a_training_update(tmp_path):
    """The memory plan's benchmark at its smallest: the tiny model in fp32 and in bf16 with checkpointing, the plan
    within 15% of the measured peak."""
    result = run_benchmark(
        "memory_plan.py", "--settings", "tiny-fp32", "tiny-bf16-checkpointing", "--threads", "1", tmp_path=tmp_path
    )
    ratios = result["ratios"]
    assert set(ratios) == {"worst_planned_over_measured", "tiny-fp32", "tiny-bf16-checkpointing"}
    for name, ratio in ratios.items():
        assert 1 / 1.15 <= ratio <= 1.15, (name, ratio)


def test_step_kernels_counts_launches_and_syncs_with_the_cuda_path_emulated(tmp_path):
    """A few decode steps of the Qwen2.5-1.5B-shaped model at a tiny width: one sync a decode step (its tokens to the
    host), none inside the layers of a prefill, and the Triton paged kernels counted as launches, not as the PyTorch
    reference's operations."""
    result = run_benchmark(
        "step_kernels.py",
        *("--hidden", "48", "--intermediate", "64", "--prompts", "2", "--branching", "2", "2"),
        *("--segment-tokens", "2", "--prompt-tokens", "6"),
        tmp_path=tmp_path,
    )
    steps = result["steps"]
    assert steps["prefill"]["steps"] == 1 and steps["decode"]["steps"] >= 1 and steps["fork"]["steps"] >= 1
    assert steps["decode"]["syncs_per_step"] == 1 and steps["prefill"]["syncs_in_layers_per_step"] == 0
    layer_ops = steps["decode"]["ops"]["layer"]
    assert layer_ops["triton_paged_attention"] == 1 and layer_ops["triton_merge_states"] == 1
    assert "_scaled_dot_product_flash_attention_for_cpu" not in layer_ops  # the reference ran uncounted
    assert steps["decode"]["ops"]["head_and_draw"]["device_to_host_copy"] == 1
    assert result["ratios"]["decode_kernels_per_layer"] == steps["decode"]["kernels_per_layer"]
