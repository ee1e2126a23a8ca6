"""treerpo inside TRL's GRPOTrainer: the engine's rollout, TreeRPOTrainer, and the options they refuse."""

import os
import tempfile

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from treerpo.algorithms.loss import policy_loss  # noqa: E402
from treerpo.attention import enable_tree_attention  # noqa: E402
from treerpo.data.tasks import load_task, make_reward  # noqa: E402
from treerpo.engine.tree_sampler import TreeSampler  # noqa: E402
from treerpo.integrations.trl import TreeRPOConfig, TreeRPOTrainer, UnsupportedTRLOption, treerpo_rollout  # noqa: E402
from treerpo.models.tiny import DEFAULT_MODEL_DIR, load_model_and_tokenizer  # noqa: E402
from treerpo.policy.logprobs import packed_logprobs  # noqa: E402
from treerpo.trees.flatten import flatten_trees  # noqa: E402
from treerpo.trees.packing import pack_trees  # noqa: E402
from treerpo.trees.token_weights import loss_token_count  # noqa: E402

COMMON = dict(
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    bf16=False,
    shuffle_dataset=False,
    lr_scheduler_type="constant",
    max_grad_norm=1e9,
)


def tiny():
    model, tokenizer = load_model_and_tokenizer(None)
    model.config._name_or_path = str(DEFAULT_MODEL_DIR)  # TRL loads a reference model from here when beta > 0
    return model, tokenizer


def same_length_rows(tokenizer, count: int) -> list[dict]:
    """Chain problems whose prompts have equal token counts (TRL's batched generate pads nothing)."""
    task = load_task("synthetic", None, 1, tokenizer)
    pairs = [pair for step in range(40) for pair in task.batch(step, 8, 0)]
    length = len(tokenizer(pairs[0][0])["input_ids"])
    rows = [{"prompt": p, "answer": a} for p, a in pairs if len(tokenizer(p)["input_ids"]) == length]
    return rows[:count]


def varied_reward(seen: list):
    """Differs within a group of identical completions (row parity), so greedy groups still have advantages."""

    def reward(prompts, completions, answer, **kwargs):
        seen.extend(completions)
        return [float((len(c) + i) % 3) for i, c in enumerate(completions)]

    return reward


def grpo_run(rollout_func, rows, generation_kwargs=None, seed=0, max_steps=1, **overrides):
    torch.manual_seed(seed)
    model, tokenizer = tiny()
    seen = []
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=40,
        learning_rate=1e-3,
        beta=0.0,
        seed=seed,
        generation_kwargs=generation_kwargs,
        **{**COMMON, **overrides},
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=varied_reward(seen),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        rollout_func=rollout_func,
    )
    return trainer, seen


def test_greedy_rollout_gives_trl_its_own_completions_and_update():
    _, tokenizer = tiny()
    rows = same_length_rows(tokenizer, 4)
    initial = {k: v.clone() for k, v in tiny()[0].state_dict().items()}
    results = []
    for rollout in (None, treerpo_rollout()):
        trainer, seen = grpo_run(rollout, rows, {"do_sample": False})
        trainer.train()
        results.append((seen, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}))
    (trl_text, trl_weights), (engine_text, engine_weights) = results
    assert len(engine_text) == 8 and engine_text == trl_text
    assert max((trl_weights[k] - engine_weights[k]).abs().max().item() for k in trl_weights) < 1e-6
    assert max((trl_weights[k] - initial[k]).abs().max().item() for k in initial) > 1e-4  # a real update


def test_sampled_rollout_returns_groups_with_the_models_logprobs(monkeypatch):
    _, tokenizer = tiny()
    rows = same_length_rows(tokenizer, 4)[:2] + [{"prompt": "7+5-2=", "answer": "10"}] * 2
    trainer, _ = grpo_run(treerpo_rollout(pool_tokens=4096), rows)
    prompts = [r["prompt"] for r in rows for _ in range(4)]
    calls, sample = [], TreeSampler.sample

    def recorded(self, prompt_ids, spec, *args, **kwargs):
        calls.append((spec.branching, len(prompt_ids)))
        return sample(self, prompt_ids, spec, *args, **kwargs)

    monkeypatch.setattr(TreeSampler, "sample", recorded)
    out = trainer.rollout_func(prompts, trainer)
    assert len(out["completion_ids"]) == len(prompts) == len(out["logprobs"])
    model = trainer.model.eval()
    eos = set(trainer.eos_token_ids)
    for prompt, prompt_ids, completion, logprobs in zip(
        prompts, out["prompt_ids"], out["completion_ids"], out["logprobs"], strict=True
    ):
        assert prompt_ids == tokenizer(prompt)["input_ids"]
        assert 1 <= len(completion) <= 40 and (len(completion) == 40 or completion[-1] in eos)
        assert not eos & set(completion[:-1])  # cut after the first EOS, as TRL's generate does
        ids = torch.tensor([prompt_ids + completion])
        with torch.no_grad():
            reference = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1 : -1].float(), -1)
        expected = reference.gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        assert np.allclose(logprobs, expected.numpy(), atol=1e-4)
    # the last two rows are one prompt repeated: one group of 8 sampled completions in the same engine call
    assert len({tuple(c) for c in out["completion_ids"][8:]}) > 1
    assert calls == [((4,), 2), ((8,), 1)]


@pytest.mark.parametrize(
    "optim, hook_only",
    [(None, False), (None, True), ("adamw_torch", False)],
    ids=["trl_default", "trl_default-hook_only", "adamw_torch"],
)
def test_rollout_logprobs_follow_the_weights_under_trls_optimizer(optim, hook_only, monkeypatch):
    """TRL's default optimizer is fused AdamW, whose step bumps no ``param._version``: after steps on the same
    prompts (their K/V cached by the engine), the rollout's log-probs still equal a forward of the current weights.
    ``hook_only``: the engine's fingerprint check is off, so only its hook on TRL's (wrapped) optimizer acts."""
    if hook_only:
        from treerpo.engine.weights_watch import WeightsWatch

        monkeypatch.setattr(WeightsWatch, "changed", lambda self: False)
    _, tokenizer = tiny()
    rows = same_length_rows(tokenizer, 2) * 2  # the same prompts at every step
    trainer, _ = grpo_run(treerpo_rollout(pool_tokens=4096), rows, max_steps=2, **({"optim": optim} if optim else {}))
    if optim is None:
        assert "fused" in getattr(trainer.args.optim, "value", trainer.args.optim)  # the case this test is for
    trainer.train()
    prompts = [r["prompt"] for r in rows for _ in range(4)]
    out = trainer.rollout_func(prompts, trainer)
    model = trainer.model.eval()
    for prompt_ids, completion, logprobs in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"], strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + completion])).logits[0, len(prompt_ids) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        assert np.abs(np.asarray(logprobs) - expected.numpy()).max() < 1e-4


def test_resume_under_trls_defaults_equals_the_uninterrupted_run():
    """TRL's save and resume_from_checkpoint with its default (fused) optimizer: the resumed run's engine starts with
    an empty cache, the uninterrupted one must not keep K/V of the weights before the last step."""
    _, tokenizer = tiny()
    rows = same_length_rows(tokenizer, 2) * 3
    saving = dict(save_strategy="steps", save_steps=1)
    straight, _ = grpo_run(treerpo_rollout(pool_tokens=4096), rows, max_steps=3, **saving)
    straight.train()
    first, _ = grpo_run(treerpo_rollout(pool_tokens=4096), rows, max_steps=3, **saving)
    first.args.max_steps = 1
    first.train()
    resumed, _ = grpo_run(treerpo_rollout(pool_tokens=4096), rows, max_steps=3, **saving)
    resumed.train(resume_from_checkpoint=os.path.join(first.args.output_dir, "checkpoint-1"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


# ---- TreeRPOTrainer ---------------------------------------------------------------------------------------
def treerpo_trl(rows, max_steps=1, **overrides):
    torch.manual_seed(0)
    model, tokenizer = tiny()
    task = load_task("synthetic", None, 1, tokenizer)
    verifier = make_reward(task.reward_kind)

    def reward(prompts, completions, answer, **kwargs):  # the verifier plus a length term: most groups differ
        return [v + len(c) % 3 for v, c in zip(verifier(completions, answer), completions, strict=True)]

    settings = dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=max_steps,
        branching=[2, 2],
        segment_tokens=20,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-4,
        beta=0.0,
        tau=0.0,
        **COMMON,
    )
    args = TreeRPOConfig(**{**settings, **overrides})
    return TreeRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


def chain_rows(count: int) -> list[dict]:
    _, tokenizer = tiny()
    task = load_task("synthetic", None, 1, tokenizer)
    return [{"prompt": p, "answer": a} for step in range(count // 4) for p, a in task.batch(step, 4, 0)]


def gradients(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def treerpo_own_gradient(trees):
    """What treerpo's own trainer computes for one minibatch: all trees packed, one token-mean PPO loss."""
    model, _ = tiny()
    enable_tree_attention(model)
    packed = pack_trees(trees, prune_unkept=True)
    logp = packed_logprobs(model, packed)
    loss, _ = policy_loss(
        logp,
        logp.detach(),
        packed.advantages[packed.loss_mask],
        clip_low=0.2,
        clip_high=0.2,
        normalizer=sum(map(loss_token_count, trees)),
    )
    loss.backward()
    return float(loss), gradients(model)


def flattened_gradient(trees, state_dict=None, beta=0.0):
    """An independent reference: every root-to-leaf row through the model's own attention (no tree mask),
    tokens weighted by flatten_trees; with ``beta``, TRL's KL (k3 times the importance ratio) to the initial
    model, weighted the same way."""
    model, _ = tiny()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    reference, _ = tiny()
    flat = flatten_trees(trees)

    def completion_logprobs(net, prompt, completion):
        logits = net(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)

    total = 0.0
    for prompt, completion, advantage, weight in zip(
        flat.prompt_ids, flat.completion_ids, flat.token_advantages, flat.token_weights, strict=True
    ):
        logp = completion_logprobs(model, prompt, completion)
        ratio = torch.exp(logp - logp.detach())
        loss = -(torch.as_tensor(advantage, dtype=torch.float32) * ratio).sum()
        if beta:
            with torch.no_grad():
                delta = completion_logprobs(reference, prompt, completion) - logp
            delta = delta.detach() + logp.detach() - logp  # ref - logp, differentiable in logp
            kl = torch.exp(delta) - delta - 1.0
            loss = loss + beta * (torch.as_tensor(weight, dtype=torch.float32) * kl * ratio).sum()
        (loss / flat.loss_tokens).backward()
        total += float(loss) / flat.loss_tokens
    return total, gradients(model)


def assert_same_gradients(grads, reference):
    assert grads.keys() == reference.keys()
    scale = max(g.abs().max().item() for g in reference.values())
    assert scale > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, reference[name], atol=1e-5 * scale, rtol=1e-4), name


def sampled_chunks(trainer):
    rows = list(trainer.get_train_dataloader())[0]
    trees = trainer.sample_trees(rows)
    trainer.score_trees(trees, rows)
    return trees, trainer.prepare_chunks(trees)


def chunk_gradients(trainer, chunks):
    trainer.model.zero_grad(set_to_none=True)
    loss = 0.0
    for chunk in chunks:
        chunk_loss = trainer.compute_loss(trainer.model, chunk)
        chunk_loss.backward()
        loss += float(chunk_loss)
    return loss, gradients(trainer.model)


def test_treerpo_trainer_loss_and_gradients_equal_treerpo_trainer():
    trainer = treerpo_trl(chain_rows(16), per_device_train_batch_size=16, micro_batch_tokens=64)
    trees, chunks = sampled_chunks(trainer)
    assert len(chunks) == 2 and sum(len(c.batches) for c in chunks) > 2  # several micro-batches per step
    assert all(c.normalizer == sum(map(loss_token_count, trees)) for c in chunks)  # one optimizer step's loss tokens
    loss, grads = chunk_gradients(trainer, chunks)
    for reference_loss, reference_grads in (treerpo_own_gradient(trees), flattened_gradient(trees)):
        assert abs(loss - reference_loss) < 1e-5 * max(1.0, abs(reference_loss))
        assert_same_gradients(grads, reference_grads)


def test_treerpo_trainer_kl_gradient_is_trls_bias_corrected_kl():
    trainer = treerpo_trl(chain_rows(8), beta=0.5, micro_batch_tokens=64)
    torch.manual_seed(1)
    with torch.no_grad():  # the policy moves away from TRL's reference model (the initial weights)
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trees, chunks = sampled_chunks(trainer)
    loss, grads = chunk_gradients(trainer, chunks)
    reference_loss, reference_grads = flattened_gradient(trees, trainer.model.state_dict(), beta=0.5)
    assert abs(loss - reference_loss) < 1e-5 * max(1.0, abs(reference_loss)) and reference_loss > 0
    assert_same_gradients(grads, reference_grads)


def test_training_step_backward_per_micro_batch_equals_the_chunk_loss():
    trainer = treerpo_trl(chain_rows(16), per_device_train_batch_size=16, micro_batch_tokens=64)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    rows = list(trainer.get_train_dataloader())[0]
    trainer.model.zero_grad(set_to_none=True)
    reported = trainer.training_step(trainer.model, rows)
    stepped = gradients(trainer.model)
    first = trainer._buffered_inputs[0]
    assert len(first.batches) > 1
    loss, grads = chunk_gradients(trainer, [first])
    assert abs(float(reported) - loss) < 1e-6
    assert_same_gradients(stepped, grads)


@pytest.mark.parametrize("generation_steps, accumulation, iterations", [(2, 2, 1), (4, 2, 1), (2, 2, 2), (4, 2, 2)])
def test_every_optimizer_step_is_one_token_mean(generation_steps, accumulation, iterations):
    """TRL's schedule: micro-step s trains chunk s % steps_per_generation; an optimizer step is
    gradient_accumulation_steps micro-steps; each must sum its chunks' tokens over exactly its own count."""
    trainer = treerpo_trl(
        chain_rows(32),
        per_device_train_batch_size=16,
        steps_per_generation=generation_steps,
        gradient_accumulation_steps=accumulation,
        num_iterations=iterations,
    )
    trees, chunks = sampled_chunks(trainer)
    assert len(chunks) == generation_steps
    share = {}
    for step in range(generation_steps * iterations):
        chunk = chunks[step % generation_steps]
        tokens = sum(len(b.rows) for b in chunk.batches)
        if tokens:
            share[step // accumulation] = share.get(step // accumulation, 0.0) + tokens / chunk.normalizer
    assert share and all(abs(v - 1.0) < 1e-9 for v in share.values())
    off_policy = generation_steps > accumulation or iterations > 1
    assert all((b.old_logprobs is not None) == off_policy for c in chunks for b in c.batches)


def test_treerpo_trainer_trains_saves_and_reloads(tmp_path):
    trainer = treerpo_trl(
        chain_rows(16), max_steps=3, beta=0.04, save_strategy="steps", save_steps=3, output_dir=str(tmp_path)
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 0
    logged = [entry for entry in trainer.state.log_history if "tree/leaves" in entry]
    assert len(logged) == 3 and all(entry["tree/leaves"] == 16 for entry in logged) and "kl" in logged[0]
    reloaded, _ = load_model_and_tokenizer(str(tmp_path / "checkpoint-3"))
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, after[name]), name


def test_a_generation_with_no_kept_group_steps_as_plain_trl():
    """tau drops every group: as TRL does when all rewards of every group are equal, the optimizer still steps (zero
    policy gradient, the KL term with beta > 0) and the step logs its kl."""
    trainer = treerpo_trl(chain_rows(8), max_steps=1, beta=0.04, tau=1e9)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "tree/leaves" in entry]
    assert logged[0]["tree/kept_group_fraction"] == 0.0 and "kl" in logged[0]
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    stepped = [p for group in optimizer.param_groups for p in group["params"] if optimizer.state.get(p)]
    assert stepped and all(int(optimizer.state[p]["step"]) == 1 for p in stepped)
    assert len(stepped) == sum(1 for p in trainer.model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(loss_type="grpo"), "loss_type='grpo'"),
        (dict(importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(scale_rewards="batch"), "scale_rewards"),
        (dict(mask_truncated_completions=True), "mask_truncated_completions"),
        (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
        (dict(num_generations=3), "num_generations=3"),
        (dict(max_completion_length=10), "max_completion_length=10"),
        (dict(eval_strategy="steps", eval_steps=1), "eval_strategy"),
        (dict(advantage_norm="zscore"), "advantage_norm"),
        (dict(steps_per_generation=3, gradient_accumulation_steps=2), "steps_per_generation=3"),
        (dict(steps_per_generation=2, gradient_accumulation_steps=4), "steps_per_generation=2"),
        (dict(log_completions=True), "log_completions"),
    ],
)
def test_treerpo_config_refuses_what_it_would_reinterpret(option, message):
    with pytest.raises(UnsupportedTRLOption, match=message):
        TreeRPOConfig(output_dir=tempfile.mkdtemp(), branching=[2, 2], segment_tokens=8, **{**COMMON, **option})


def test_treerpo_trainer_refuses_unsupported_sampling_and_rollouts():
    with pytest.raises(UnsupportedTRLOption, match="top_k=5"):
        treerpo_trl(chain_rows(4), top_k=5)
    with pytest.raises(UnsupportedTRLOption, match="greedy"):
        treerpo_trl(chain_rows(4), generation_kwargs={"do_sample": False})
    with pytest.raises(UnsupportedTRLOption, match="temperature"):
        treerpo_trl(chain_rows(4), generation_kwargs={"temperature": 0.7})
    with pytest.raises(UnsupportedTRLOption, match="rollout_func"):
        TreeRPOTrainer(
            model=tiny()[0],
            reward_funcs=lambda **k: [],
            args=TreeRPOConfig(output_dir=tempfile.mkdtemp(), branching=[2], segment_tokens=8, **COMMON),
            rollout_func=lambda p, t: {},
        )


@pytest.mark.parametrize(
    "generation_kwargs, overrides, message",
    [
        ({"num_beams": 2}, {}, "num_beams"),
        (None, {"repetition_penalty": 1.2}, "repetition_penalty=1.2"),
        (None, {"min_p": 0.1}, "min_p=0.1"),
    ],
)
def test_rollout_refuses_generation_options_it_cannot_honour(generation_kwargs, overrides, message):
    _, tokenizer = tiny()
    trainer, _ = grpo_run(treerpo_rollout(), same_length_rows(tokenizer, 2), generation_kwargs, **overrides)
    with pytest.raises(UnsupportedTRLOption, match=message):
        trainer.rollout_func(["1+2="] * 4, trainer)


def test_treerpo_trainer_refuses_a_leaf_no_reward_function_scored():
    trainer = treerpo_trl(chain_rows(4), per_device_train_batch_size=4)
    trainer.reward_funcs[0] = lambda completions, **kwargs: [None] * len(completions)
    rows = list(trainer.get_train_dataloader())[0]
    trees = trainer.sample_trees(rows)
    with pytest.raises(ValueError, match="a tree needs a reward on every leaf"):
        trainer.score_trees(trees, rows)


# ---- PEFT ------------------------------------------------------------------------------------------------
def lora_treerpo_trl(rows, beta: float):
    """TreeRPOTrainer with TRL's ``peft_config``: a rank-4 adapter, randomly initialised (PEFT's default starts B
    at zero, the identity, where the KL term would vanish)."""
    torch.manual_seed(0)
    model, tokenizer = tiny()
    verifier = make_reward(load_task("synthetic", None, 1, tokenizer).reward_kind)

    def reward(prompts, completions, answer, **kwargs):
        return [v + len(c) % 3 for v, c in zip(verifier(completions, answer), completions, strict=True)]

    args = TreeRPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=1,
        branching=[2, 2],
        segment_tokens=20,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        beta=beta,
        tau=0.0,
        micro_batch_tokens=64,
        **COMMON,
    )
    return TreeRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")


def peft_copy(peft_model):
    """A fresh tiny model under the same adapter with the same adapter weights (a deepcopy of a PeftModel does not
    disable its adapter)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    copy = get_peft_model(tiny()[0], lora_config())
    set_peft_model_state_dict(copy, get_peft_model_state_dict(peft_model))
    return copy


def flattened_peft_gradient(trees, peft_model, beta: float):
    """An independent reference through the PEFT model's own forward, one root-to-leaf row at a time, the
    reference log-probs with the adapter disabled; TRL's KL (k3 times the ratio)."""
    flat = flatten_trees(trees)

    def completion_logprobs(prompt, completion):
        logits = peft_model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)

    total = 0.0
    for prompt, completion, advantage, weight in zip(
        flat.prompt_ids, flat.completion_ids, flat.token_advantages, flat.token_weights, strict=True
    ):
        logp = completion_logprobs(prompt, completion)
        ratio = torch.exp(logp - logp.detach())
        with torch.no_grad(), peft_model.disable_adapter():
            delta = completion_logprobs(prompt, completion) - logp
        delta = delta.detach() + logp.detach() - logp
        kl = torch.exp(delta) - delta - 1.0
        loss = -(torch.as_tensor(advantage, dtype=torch.float32) * ratio).sum()
        loss = loss + beta * (torch.as_tensor(weight, dtype=torch.float32) * kl * ratio).sum()
        (loss / flat.loss_tokens).backward()
        total += float(loss) / flat.loss_tokens
    return total, gradients(peft_model)


def test_peft_config_trains_the_adapter_against_the_base_as_reference():
    trainer = lora_treerpo_trl(chain_rows(8), beta=0.5)
    reference_model = peft_copy(trainer.model)
    trees, chunks = sampled_chunks(trainer)
    loss, grads = chunk_gradients(trainer, chunks)
    assert grads and all("lora_" in name for name in grads), "only the adapter trains"
    reference_loss, reference_grads = flattened_peft_gradient(trees, reference_model, beta=0.5)
    assert abs(loss - reference_loss) < 1e-5 * max(1.0, abs(reference_loss)) and reference_loss != 0
    assert_same_gradients(grads, reference_grads)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if "lora_" not in n)
