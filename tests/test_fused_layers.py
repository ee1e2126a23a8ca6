"""Fused RMSNorm and rotary kernels against the Hugging Face code they replace, and the engine with them.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set in conftest), in fp32 and fp16 (the interpreter
computes bf16 wrongly).
"""

import numpy as np
import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

from helpers import tiny_model
from treerpo.engine import fused_layers
from treerpo.engine.tree_sampler import TreeSampler
from treerpo.kernels.rms_norm import rms_norm
from treerpo.kernels.rope import apply_rope
from treerpo.models.tiny import build_char_tokenizer
from treerpo.tree import TreeSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if DEVICE == "cuda" else []
)  # the interpreter's bf16 is wrong


def relative_error(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def ulps_apart(got: torch.Tensor, want: torch.Tensor) -> int:
    """Largest distance in units of the last place (of ``want``'s dtype) between two same-dtype tensors."""
    step = torch.finfo(want.dtype).eps * want.abs().clamp(min=torch.finfo(want.dtype).tiny).float()
    return int(((got.float() - want.float()).abs() / step).max().ceil())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_dtype", ["same", "fp32"])
def test_rms_norm_is_the_llama_module(dtype, weight_dtype):
    """Same dtype as the module's output (an fp32 weight promotes), values within rounding (a few units in the last
    place: the fp32 sum of squares adds up in another order, rsqrt may differ in its last bit), on a strided input."""
    torch.manual_seed(0)
    module = modeling_qwen2.Qwen2RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.rand(48) * 2)
    if weight_dtype == "fp32":
        module.weight.data = module.weight.data.float()
    module = module.to(DEVICE)
    x = (torch.randn(7, 96) * 4).to(DEVICE, dtype)[:, ::2]  # a strided view: copied to rows first
    with torch.no_grad():
        want = module(x)
    got = rms_norm(x, module.weight, module.variance_epsilon)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert ulps_apart(got, want) <= 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_rope_is_the_llama_function_on_hugging_faces_layout(dtype, cos_batch):
    """q and k as the attention makes them (projections viewed [B, T, H, D] and transposed): the rotated values equal
    ``apply_rotary_pos_emb``'s within rounding, laid out as the inputs."""
    torch.manual_seed(1)
    b, t, hq, hkv, d = 2, 5, 6, 2, 16
    q = torch.randn(b, t, hq, d).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(b, t, hkv, d).to(DEVICE, dtype).transpose(1, 2)
    angles = torch.rand(cos_batch, t, d // 2) * 20
    cos, sin = (f(torch.cat([angles, angles], -1)).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got = apply_rope(q, k, cos, sin)
    for g, w, x in zip(got, want, (q, k), strict=True):
        assert g.shape == w.shape and g.stride() == x.stride()
        assert ulps_apart(g, w) <= 4


def test_rope_refuses_what_it_does_not_compute():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cos = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="one dtype"):
        apply_rope(q, k, cos.half(), cos.half())
    with pytest.raises(ValueError, match="an even head dim"):
        apply_rope(q[..., :7], k[..., :7], cos[..., :7], cos[..., :7])


def test_only_families_that_compute_as_llama_are_swapped():
    """Llama, Qwen2 and Mistral norms and rotary are Llama's code; Gemma's norm (1 + weight) and Cohere's
    interleaved rotary are not, and keep their own."""
    from transformers.models.cohere import modeling_cohere
    from transformers.models.gemma import modeling_gemma
    from transformers.models.mistral import modeling_mistral

    assert fused_layers.llama_style_norm(modeling_qwen2.Qwen2RMSNorm(8))
    assert fused_layers.llama_style_norm(modeling_mistral.MistralRMSNorm(8))
    assert not fused_layers.llama_style_norm(modeling_gemma.GemmaRMSNorm(8))
    assert fused_layers.llama_style_rope(modeling_qwen2) and fused_layers.llama_style_rope(modeling_llama)
    assert not fused_layers.llama_style_rope(modeling_cohere)


def test_swapped_code_is_inactive_outside_the_engines_forwards():
    """After the swap a plain forward (training, generate) runs the model's own code: identical logits."""
    model = tiny_model(vocab=50)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert fused_layers.enable_fused_layers(model) == {"norms": 5, "rope_families": 1}
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_engine_with_fused_layers_samples_the_trees_of_the_models_own_code(dtype):
    """The engine's forwards with the fused kernels (forced here, the CUDA default): greedy trees identical to those
    of the model's own code, sampled trees' log-probs within the dtype's rounding."""
    tok = build_char_tokenizer()
    prompts = [tok("12+3=")["input_ids"], tok("7-4=")["input_ids"]]
    runs = {}
    for fused in (False, True):
        model = tiny_model(vocab=len(tok), seed=3).to(DEVICE, dtype)
        sampler = TreeSampler(model, tok, pool_tokens=512)
        sampler.runner.fused_layers = False  # the default on CUDA: turned on below only
        if fused:
            assert sampler.runner.use_fused_layers()["norms"] == 5
        greedy = sampler.sample(prompts, TreeSpec((2, 2), segment_tokens=4, temperature=0.0))
        sampled = sampler.sample(prompts, TreeSpec((2, 2), segment_tokens=4, temperature=1.0), seeds=[0, 1])
        runs[fused] = (greedy, sampled)
    for off, on in zip(runs[False][0], runs[True][0], strict=True):
        assert off.token_ids.tolist() == on.token_ids.tolist()
    for off, on in zip(runs[False][1], runs[True][1], strict=True):
        assert off.token_ids.tolist() == on.token_ids.tolist()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        np.testing.assert_allclose(on.token_logprobs, off.token_logprobs, atol=tol, rtol=tol)


def test_the_first_use_check_accepts_the_kernels_here():
    assert fused_layers.fused_kernels_work(torch.device(DEVICE), torch.float32) is None


def test_kernels_that_disagree_with_the_models_code_are_not_used(monkeypatch):
    """The first-use check: a fused norm off by 1% is caught, the engine keeps the model's own code and says why."""
    from treerpo.kernels import rms_norm as rms_norm_module

    real = rms_norm_module.rms_norm
    monkeypatch.setattr(rms_norm_module, "rms_norm", lambda *args: real(*args) * 1.01)
    tok = build_char_tokenizer()
    sampler = TreeSampler(tiny_model(vocab=len(tok)), tok, pool_tokens=64)  # on the CPU: fused layers off
    with pytest.warns(UserWarning, match="fused RMSNorm and rotary kernels not used.*differs"):
        assert sampler.runner.use_fused_layers() == {"norms": 0, "rope_families": 0}
    assert not sampler.runner.fused_layers
