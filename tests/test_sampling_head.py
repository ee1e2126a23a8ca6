"""The engine's LM head: logits against an fp64 reference on every route, and the fp32 copy made once per weights."""

import numpy as np
import pytest
import torch

from helpers import tiny_model
from treerpo.engine.sampling_head import SamplingHead, native_matmul
from treerpo.engine.tree_sampler import TreeSampler
from treerpo.models.tiny import build_char_tokenizer
from treerpo.policy.lm_head import LMHead
from treerpo.tree import TreeSpec


def fp64_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The head's products in fp64 from the model's own values, with Gemma-style soft-capping when configured."""
    weight = model.get_output_embeddings().weight.detach().double()
    logits = hidden.double() @ weight.t()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precision", ["model", "fp32"])
def test_logits_are_the_heads_products_on_every_route(dtype, precision):
    """fp32 products (the fp32 model, the fp32 copy) agree with fp64 to fp32 rounding; products in the model's
    dtype to that dtype's rounding of the logits (2^-8 for bf16), post-processing (soft-capping) included."""
    model = tiny_model(vocab=300).to(dtype)
    model.config.final_logit_softcapping = 5.0
    hidden = (torch.randn(9, model.config.hidden_size) * 3).to(dtype)
    head = SamplingHead(LMHead(model), precision)
    logits = head.logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (9, 300)
    native = native_matmul(dtype, torch.device("cpu"))
    expected_route = "fp32" if dtype == torch.float32 else "model" if precision == "model" and native else "copy"
    assert head.route() == expected_route
    exact = expected_route != "model"
    assert relative_error(logits, fp64_logits(model, hidden)) < (1e-6 if exact else 2**-8)


def test_model_route_where_the_cpu_has_the_matmul():
    """On a CPU with AMX/AVX512-BF16 a bf16 head multiplies in bf16: the logits are bf16 values (the model's rounding),
    not fp32 products."""
    if not native_matmul(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 matmul: the head takes the fp32 copy")
    model = tiny_model(vocab=300).to(torch.bfloat16)
    head = SamplingHead(LMHead(model))
    assert head.route() == "model"
    logits = head.logits(torch.randn(4, model.config.hidden_size).bfloat16())
    assert torch.equal(logits, logits.bfloat16().float())
    assert head.conversions == 0


def test_the_fp32_copy_is_made_once_per_weight_version():
    """A rollout of several decode steps, each drawn in chunks of 2 rows, converts the head once; an optimizer step
    (announced) and a write through ``.data`` (found by the fingerprint) each make one more copy, and the copy's
    logits are those of the new weights."""
    tok = build_char_tokenizer()
    model = tiny_model(vocab=len(tok)).to(torch.bfloat16)
    vocab = model.get_output_embeddings().weight.shape[0]
    sampler = TreeSampler(model, tok, pool_tokens=512, head_precision="fp32", draw_memory_bytes=2 * vocab * 12)
    head = sampler.runner.head
    prompts = [tok("1+2=")["input_ids"], tok("3+4=")["input_ids"]]
    spec = TreeSpec((2, 2), segment_tokens=4, temperature=1.0)
    sampler.sample(prompts, spec, seeds=[0, 1])
    assert head.route() == "copy" and head.conversions == 1
    sampler.sample(prompts, spec, seeds=[0, 1])
    assert head.conversions == 1

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sampler.follow_optimizer(optimizer)
    model.get_output_embeddings().weight.grad = torch.ones_like(model.get_output_embeddings().weight)
    optimizer.step()
    sampler.sample(prompts, spec, seeds=[0, 1])
    assert head.conversions == 2

    with torch.no_grad():
        model.get_output_embeddings().weight.data.mul_(-1)
    sampler.sample(prompts, spec, seeds=[0, 1])
    assert head.conversions == 3
    hidden = torch.randn(3, model.config.hidden_size).bfloat16()
    assert relative_error(head.logits(hidden), fp64_logits(model, hidden)) < 1e-6


def test_bf16_engine_logprobs_follow_the_model_within_bf16_rounding():
    """A bf16 rollout with the default head: sampled-token log-probs equal a plain forward of each path (bf16
    logits, as the model's own forward makes them) within bf16 rounding."""
    from helpers import assert_sampled_logprobs_match

    tok = build_char_tokenizer()
    model = tiny_model(vocab=len(tok)).to(torch.bfloat16)
    trees = TreeSampler(model, tok, pool_tokens=512).sample(
        [tok("12+3=")["input_ids"]], TreeSpec((2, 2), segment_tokens=3, temperature=1.0), seeds=[3]
    )
    assert_sampled_logprobs_match(trees, model, tol=5e-2)


def test_an_unknown_precision_is_refused_by_name():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"head precision must be one of \('model', 'fp32'\), got 'bf16'"):
        SamplingHead(LMHead(model), "bf16")
    assert np.isfinite(SamplingHead(LMHead(model)).logits(torch.zeros(1, 32)).numpy()).all()
