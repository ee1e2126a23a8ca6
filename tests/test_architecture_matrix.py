"""Every decoder family exact.

Each row builds a tiny random model of a Hugging Face family from its config (windows shorter than
the paths, soft-caps small enough to matter and sinks where the family has them) and passes all of:
packed log-probs on the CPU tree backends equal per-path forwards of an untouched copy of the model;
engine greedy trees equal the generate-based reference sampler's; the engine's sampled-token log-probs
equal a plain forward; a training step's gradients equal those of a per-path loss; the tree-enabled
model's plain forward equals the untouched model's.
"""

import numpy as np
import pytest
import torch
import transformers as hf

from helpers import assert_close_normwise, assert_sampled_logprobs_match, random_tree
from treerpo.attention import available_tree_backends, enable_tree_attention
from treerpo.engine import TreeSampler
from treerpo.policy.logprobs import packed_logprobs
from treerpo.sampling.reference_sampler import ReferenceTreeSampler
from treerpo.tree import TreeSpec
from treerpo.trees.packing import pack_trees

VOCAB = 48
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
LONG_WINDOW = 4096  # longer than every path here
SHORT_WINDOW = 6  # shorter than the paths

FAMILIES = {  # name: (config class, model class, config overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-window-long": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=LONG_WINDOW, max_window_layers=0),
    ),
    "qwen2-window-short": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=SHORT_WINDOW, max_window_layers=0),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "mistral-window-long": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=LONG_WINDOW)),
    "mistral-window-short": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(sliding_window=SHORT_WINDOW),
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=8)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(head_dim=8, attn_logit_softcapping=0.01, final_logit_softcapping=3.0, sliding_window=LONG_WINDOW),
    ),
    "gemma2-window-short": (  # soft-capping on every layer, a short window on every other one
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(head_dim=8, attn_logit_softcapping=0.01, sliding_window=SHORT_WINDOW),
    ),
    "gemma3-long": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(head_dim=8, sliding_window=LONG_WINDOW, final_logit_softcapping=3.0),
    ),
    "gemma3-window-short": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(head_dim=8, sliding_window=SHORT_WINDOW),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(logits_scaling=4.0, attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5),
    ),
    "gpt-oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=LONG_WINDOW),
    ),
    "gpt-oss-window-short": (  # sinks on every layer, a short window on every other one
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=SHORT_WINDOW),
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=LONG_WINDOW)),
    "starcoder2-window-short": (
        "Starcoder2Config",
        "Starcoder2ForCausalLM",
        dict(sliding_window=SHORT_WINDOW),
    ),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=8)),
}


def build(family: str, seed: int = 0):
    config_cls, model_cls, overrides = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(hf, config_cls)(**{**COMMON, **overrides})
    return getattr(hf, model_cls)(config).eval()


def twins(family):
    """The same weights twice: one untouched (the reference), one for the tree attention."""
    plain, tree = build(family), build(family)
    tree.load_state_dict(plain.state_dict())
    return plain, tree


def path_logprobs(model, ids):
    logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.as_tensor(ids)[1:, None]).squeeze(1)


def trees_for(rng):
    return [
        random_tree(rng, 7, vocab=VOCAB, prompt_len=3),
        random_tree(rng, 5, vocab=VOCAB, shape="chain", prompt_len=2),
    ]


def per_path_reference(plain, trees, batch, rows):
    out = []
    for r in rows.tolist():
        tree = trees[int(batch.tree_index[r])]
        ids = tree.path_token_ids(int(batch.node_index[r]))
        out.append(path_logprobs(plain, ids)[int(batch.position_ids[r]) - 1])
    return torch.stack(out)


CPU_BACKENDS = [b for b in ("paths", "sdpa", "flex") if b in available_tree_backends()]  # flex: forward only


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_logprobs_and_gradients(family):
    plain, tree_model = twins(family)
    enable_tree_attention(tree_model)
    assert plain.config._attn_implementation != "tree", "only the model given changes"
    rng = np.random.default_rng(0)
    trees = trees_for(rng)
    batch = pack_trees(trees)
    rows = torch.nonzero(batch.loss_mask).squeeze(1)
    with torch.no_grad():
        expected = per_path_reference(plain, trees, batch, rows)
        for backend in CPU_BACKENDS:
            got = packed_logprobs(tree_model, batch, rows, backend=backend)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"{family} {backend}")
        ids = trees[0].path_token_ids(int(trees[0].leaves()[0]))
        torch.testing.assert_close(path_logprobs(tree_model, ids), path_logprobs(plain, ids), rtol=1e-5, atol=1e-5)
    weights = torch.as_tensor(rng.normal(size=len(rows)), dtype=torch.float32)
    tree_model.train()
    (packed_logprobs(tree_model, batch, rows, backend="paths") * weights).sum().backward()
    plain.train()
    (per_path_reference(plain, trees, batch, rows) * weights).sum().backward()
    named = dict(plain.named_parameters())
    for name, p in tree_model.named_parameters():
        if p.grad is not None or named[name].grad is not None:
            assert_close_normwise(p.grad, named[name].grad, rel=1e-3, floor=1e-5, msg=f"{family} {name}")


class IdTokenizer:
    """What the samplers need of a tokenizer, for token-id prompts."""

    pad_token_id, eos_token_id, padding_side = 0, 2, "left"
    bos_token = None

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_engine_trees_and_sampled_logprobs(family):
    plain, tree_model = twins(family)
    enable_tree_attention(tree_model)
    tok = IdTokenizer()
    prompts = [[5, 9, 14, 3], [7, 7, 20], [5, 9, 14, 3]]
    spec = TreeSpec((2, 2), segment_tokens=4, temperature=0.0)
    sampler = TreeSampler(tree_model, tok, pool_tokens=1024, ignore_eos=True)
    greedy = sampler.sample(prompts, spec)
    reference = ReferenceTreeSampler(plain, tok).sample(prompts, spec)
    for a, b in zip(greedy, reference, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist(), family
    sampled = sampler.sample(prompts, TreeSpec((2, 2), segment_tokens=4, temperature=1.0), seeds=[0, 1, 2])
    assert_sampled_logprobs_match(sampled, plain)


@pytest.mark.parametrize("family, skipped", [("qwen2-window-short", True), ("qwen2-window-long", False)])
def test_a_backend_without_the_features_is_skipped_where_a_layer_needs_them(family, skipped):
    """A selected backend that implements neither windows, soft-capping nor sinks (as the Triton kernels and
    FlexAttention) runs only where a layer needs none of them: a window shorter than the paths goes to ``paths``
    and stays exact; a window longer than every path changes nothing, so the selected backend runs."""
    from treerpo.attention.registry import _backends, register_tree_backend
    from treerpo.attention.sdpa_backend import sdpa_tree_attention

    calls = []

    def plain_only(query, key, value, tin, tout, scale=None, cache=None):
        calls.append(1)
        return sdpa_tree_attention(query, key, value, tin, tout, scale=scale, cache=cache)

    register_tree_backend("plain_only", plain_only)
    try:
        plain, tree_model = twins(family)
        enable_tree_attention(tree_model)
        trees = trees_for(np.random.default_rng(0))
        batch = pack_trees(trees)
        rows = torch.nonzero(batch.loss_mask).squeeze(1)
        with torch.no_grad():
            got = packed_logprobs(tree_model, batch, rows, backend="plain_only")
            expected = per_path_reference(plain, trees, batch, rows)
    finally:
        _backends("tree").pop("plain_only")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == (0 if skipped else tree_model.config.num_hidden_layers)
