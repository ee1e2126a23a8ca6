"""Activation checkpointing recomputes each layer in the backward, outside the tree-attention block: the tree
metadata must reach the recomputed attention too (it travels as a forward keyword argument), so gradients with
checkpointing equal gradients without it."""

import numpy as np
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from helpers import assert_close_normwise, random_tree, tiny_model
from treerpo.attention import enable_tree_attention
from treerpo.policy.logprobs import packed_logprobs
from treerpo.trees.packing import pack_trees


def mistral_model():
    torch.manual_seed(0)
    return enable_tree_attention(
        MistralForCausalLM(
            MistralConfig(
                vocab_size=40,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                sliding_window=None,
            )
        )
    )


MODELS = {"qwen2": lambda: tiny_model("qwen2"), "llama": lambda: tiny_model("llama"), "mistral": mistral_model}


def gradients(model, batch, backend):
    model.zero_grad(set_to_none=True)
    logp = packed_logprobs(model, batch, backend=backend)
    (logp * batch.advantages[batch.loss_mask]).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["paths", "sdpa"])
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_gradients_with_checkpointing_equal_gradients_without(arch, reentrant, backend):
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, 8), random_tree(rng, 5, shape="fan"), random_tree(rng, 6, shape="chain")]
    batch = pack_trees(trees)
    batch.advantages[:] = torch.as_tensor(rng.normal(size=len(batch.advantages)), dtype=batch.advantages.dtype)
    model = MODELS[arch]().train()
    plain = gradients(model, batch, backend)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = gradients(model, batch, backend)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        assert_close_normwise(checkpointed[name], plain[name], rel=1e-4, floor=1e-6, msg=name)


def test_trainer_option_gives_the_same_step(tmp_path):
    """One TreeRPO step with --gradient-checkpointing equals the step without (weights after the update)."""
    from treerpo.config import make_config
    from treerpo.training.trainer import Trainer

    weights, layer_calls = [], []
    for on in (False, True):
        config = make_config(
            {
                "output_dir": str(tmp_path / str(on)),
                "prompts_per_step": 8,
                "eval_size": 8,
                "threads": 1,
                "tau": 0.0,
                "gradient_checkpointing": on,
            }
        )
        with Trainer(config, log=lambda *a: None) as trainer:
            calls = []
            layer = trainer.model.model.layers[0].self_attn  # a pre-hook: recomputation may stop early, after it
            layer.register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
            record = trainer.train_step(0)
            assert record["tokens_trained"] > 0
            layer_calls.append(len(calls))
            weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert layer_calls[1] > layer_calls[0], "the checkpointed layers were recomputed in the backward"
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=0, atol=1e-7, msg=k)
