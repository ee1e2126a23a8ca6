"""verl's PPO trainer on this CPU with treerpo's tree rollout and TreeRPO's advantages: 2 steps end to end.

A tiny Llama-type model, 8 prompts (2 a step) and a reward function are made in the test's folder; verl runs its v1
trainer with ``rollout.name=treerpo`` (trees of branching [2, 2], 4 leaves a prompt), the ``treerpo_tree`` agent loop
and ``trainer_mode`` set to a treerpo trainer that writes what each actor update receives (``dump_plugin``). Checked:
- the advantages verl's loss receives are treerpo's (``flatten_trees`` of the rebuilt trees, scaled for token-mean);
- the sampler's log-probs equal the actor's recomputed ones (same weights, same tokens), at step 2 too: the server
  got the weights of the first update (a learning rate large enough to move them);
- some sibling groups carried a signal, and GRPO through verl's own estimator runs on the same rollout.

The CPU platform, the gloo-only process group and the Ray resources are test scaffolding (``cpu_platform.py``); if
verl's own CPU support changes, ``test_verl_still_needs_the_cpu_scaffolding`` says so.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed here (bash run.sh test runs it in .venv-verl)")

from treerpo.integrations.verl.advantages import FIELD, sample_advantages, verl_token_mean_scale

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def _run(folder: Path, mode: str, estimator: str, steps: int) -> subprocess.CompletedProcess:
    from verl_fixtures import prompts_parquet, reward_file, tiny_llama

    if not (folder / "model").exists():
        tiny_llama(folder / "model")
        prompts_parquet(folder / "train.parquet")
        prompts_parquet(folder / "val.parquet", 4)
        reward_file(folder / "reward.py")
    env = dict(
        os.environ,
        VERL_USE_EXTERNAL_MODULES="cpu_platform,treerpo.integrations.verl.plugin,dump_plugin",
        VERL_PLATFORM="cpu",
        VERL_ENGINE_DEVICE="cuda",  # the FSDP engine's class; its device calls go to the CPU platform
        PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}",
        TREERPO_VERL_DUMP=str(folder / f"dump-{estimator}"),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        RAY_DEDUP_LOGS="0",
    )
    args = [
        "trainer.device=cpu", "trainer.n_gpus_per_node=1", "trainer.nnodes=1", f"trainer.v1.trainer_mode={mode}",
        f"trainer.total_training_steps={steps}", "trainer.val_before_train=False", "trainer.test_freq=-1",
        "trainer.save_freq=-1", "trainer.logger=[console]", "trainer.project_name=treerpo",
        f"trainer.experiment_name={estimator}", f"trainer.default_local_dir={folder / 'checkpoints'}",
        f"algorithm.adv_estimator={estimator}",
        f"data.train_files={folder / 'train.parquet'}", f"data.val_files={folder / 'val.parquet'}",
        "data.train_batch_size=2", "data.max_prompt_length=16", "data.max_response_length=16",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={folder / 'model'}", "actor_rollout_ref.model.use_remove_padding=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.use_torch_compile=False", "actor_rollout_ref.actor.optim.lr=0.01",
        "actor_rollout_ref.rollout.name=treerpo", "actor_rollout_ref.rollout.n=4",
        "+actor_rollout_ref.rollout.engine_kwargs.treerpo.branching=[2,2]",
        "+actor_rollout_ref.rollout.engine_kwargs.treerpo.segment_tokens=4",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.agent.default_agent_loop=treerpo_tree",
        "reward.num_workers=1", f"reward.custom_reward_function.path={folder / 'reward.py'}",
        "reward.custom_reward_function.name=compute_score",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "ray_kwargs.ray_init.num_cpus=16", "+ray_kwargs.ray_init.num_gpus=1",
    ]  # fmt: skip
    for attempt in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "verl.trainer.main_ppo", *args],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        # verl picks its rendezvous port by binding port 0 and letting it go: another process may take it first
        if proc.returncode == 0 or "DistNetworkError" not in proc.stdout + proc.stderr or attempt:
            return proc
    return proc


def _explain(proc: subprocess.CompletedProcess) -> str:
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    return (
        f"verl exited {proc.returncode}. If the failure is in verl's platform, process group, engine or Ray "
        "resources, verl's CPU support changed under tests/verl_integration/cpu_platform.py; the output's end:\n" + tail
    )


def _metric(out: str, step: int, name: str) -> float:
    line = next(ln for ln in out.splitlines() if re.search(rf"\bstep:{step} - ", ln))
    return float(re.search(rf"{re.escape(name)}:([-0-9.e]+)", line).group(1))


@pytest.fixture(scope="module")
def treerpo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verl")
    proc = _run(folder, "treerpo_dump", "treerpo", steps=2)
    assert proc.returncode == 0, _explain(proc)
    return folder, proc.stdout + proc.stderr


def test_two_steps_with_trees_and_tree_advantages(treerpo_run):
    folder, out = treerpo_run
    for step in (1, 2):
        assert _metric(out, step, "treerpo/trees") == 2  # 2 prompts a step, a tree each
        # the sampler's log-probs are the actor's: the same tokens, and at step 2 the weights of step 1's update
        assert _metric(out, step, "training/rollout_probs_diff_max") < 1e-4
    assert max(_metric(out, s, "treerpo/kept_groups") for s in (1, 2)) > 0, "no sibling group carried a signal"


@pytest.mark.parametrize("step", [1, 2])
def test_verl_receives_treerpos_advantages(treerpo_run, step):
    folder, _ = treerpo_run
    dump = torch.load(folder / "dump-treerpo" / f"step{step}.pt", weights_only=False)
    mask = dump["response_mask"].float()
    rewards = dump["rm_scores"].sum(-1).tolist()
    pairs = zip(dump["is_padding"], dump["extra_fields"], strict=True)
    samples = [None if pad else (extra or {}).get(FIELD) for pad, extra in pairs]
    expected = sample_advantages(samples, rewards)
    # 2 trees of up to 4 leaves (a branch ending with EOS early has no children); a prompt's samples past its
    # tree's leaves repeat a leaf, carry no tree fields and get advantage 0
    leaves = sum(len([x for x in tree.leaves() if x != 0]) for tree in expected.trees)
    assert len(expected.trees) == 2 and sum(s is not None for s in samples) == leaves <= 8
    scale = verl_token_mean_scale(int(mask.sum()), expected.loss_tokens)
    want = torch.zeros_like(mask)
    for i, adv in enumerate(expected.advantages):
        if adv is not None:
            want[i, : len(adv)] = torch.as_tensor(adv * scale, dtype=torch.float32)
    got = dump["advantages"].float() * mask
    torch.testing.assert_close(got, want * mask, atol=1e-6, rtol=0)
    # each sample's response is its leaf's path: as many tokens as the tree's segments on it
    for i, fields in enumerate(samples):
        if fields is not None:
            assert int(mask[i].sum()) == _path_length(fields)
    np.testing.assert_allclose(dump["rollout_log_probs"] * mask, dump["old_log_probs"] * mask, atol=1e-4)


def _path_length(fields: dict) -> int:
    parent, lengths, node, total = fields["parent"], fields["lengths"], fields["leaf"], 0
    while node > 0:
        total += lengths[node]
        node = parent[node]
    return total


def test_grpo_through_verls_estimator(tmp_path):
    """The same rollout and trainer with ``adv_estimator=grpo``: verl's own GRPO advantages, one step."""
    proc = _run(tmp_path, "treerpo", "grpo", steps=1)
    assert proc.returncode == 0, _explain(proc)
    out = proc.stdout + proc.stderr
    assert "step:1 - " in out and "treerpo/trees" not in out


def test_verl_still_needs_the_cpu_scaffolding():
    """verl 0.9.1 registers no CPU platform and no "treerpo" rollout: if either changes, this says which."""
    code = (
        "from verl.plugin.platform.platform_manager import PlatformRegistry as P; "
        "from verl.workers.rollout.base import _ROLLOUT_REGISTRY as R; "
        "print(sorted(P.registered_names()), sorted(k[0] for k in R))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    platforms = out.strip().splitlines()[-1]
    assert "'cpu'" not in platforms.split("]")[0], f"verl registers a CPU platform now: {platforms}"
    assert "treerpo" not in platforms.split("]")[1], platforms
