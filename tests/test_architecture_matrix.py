"""Every decoder family: exact or refused.

Each row builds a tiny random model of a Hugging Face family from its config (windows shorter than
the paths and soft-caps small enough to matter where the family has them) and either passes all of:
packed log-probs on the CPU tree backends equal per-path forwards of an untouched copy of the model;
engine greedy trees equal the generate-based reference sampler's; the engine's sampled-token log-probs
equal a plain forward; a training step's gradients equal those of a per-path loss; the tree-enabled
model's plain forward equals the untouched model's; or it is refused with the documented error.
"""

import numpy as np
import pytest
import torch
import transformers as hf

from helpers import assert_close_normwise, random_tree
from treerpo.attention import available_tree_backends, enable_tree_attention
from treerpo.attention.hf_integration import UnsupportedModelError
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

FAMILIES = {  # name: (config class, model class, config overrides, None = exact | regex of the refusal)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, None),
    "qwen2-window-long": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=LONG_WINDOW, max_window_layers=0),
        None,
    ),
    "qwen2-window-short": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=SHORT_WINDOW, max_window_layers=0),
        "sliding window of 6 positions is shorter than this batch's paths",
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8), None),
    "mistral-window-long": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=LONG_WINDOW), None),
    "mistral-window-short": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(sliding_window=SHORT_WINDOW),
        "sliding window of 6 positions is shorter",
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=8), None),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(head_dim=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=LONG_WINDOW),
        "attention logit soft-capping",
    ),
    "gemma3-long": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(head_dim=8, sliding_window=LONG_WINDOW, final_logit_softcapping=3.0),
        None,
    ),
    "gemma3-window-short": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(head_dim=8, sliding_window=SHORT_WINDOW),
        "sliding window of 6 positions is shorter",
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, None),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, None),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(logits_scaling=4.0, attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5),
        None,
    ),
    "gpt-oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=LONG_WINDOW),
        "attention sinks",
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5), None),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=LONG_WINDOW), None),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}, None),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=8), None),
}


def build(family: str, seed: int = 0):
    config_cls, model_cls, overrides, _ = FAMILIES[family]
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


def exact(family):
    return FAMILIES[family][3] is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_logprobs_and_gradients(family):
    plain, tree_model = twins(family)
    if not exact(family) and FAMILIES[family][2].get("attn_logit_softcapping") or family == "gpt-oss":
        with pytest.raises(UnsupportedModelError, match=FAMILIES[family][3]):
            enable_tree_attention(tree_model)
        assert tree_model.config._attn_implementation != "tree", "a refused model is left as it was"
        return
    enable_tree_attention(tree_model)
    assert plain.config._attn_implementation != "tree", "only the model given changes"
    rng = np.random.default_rng(0)
    trees = trees_for(rng)
    batch = pack_trees(trees)
    rows = torch.nonzero(batch.loss_mask).squeeze(1)
    if not exact(family):
        with pytest.raises(UnsupportedModelError, match=FAMILIES[family][3]):
            packed_logprobs(tree_model, batch, rows, backend="paths")
        return
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


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if exact(f) or "window" in f))
def test_engine_trees_and_sampled_logprobs(family):
    plain, tree_model = twins(family)
    enable_tree_attention(tree_model)
    tok = IdTokenizer()
    prompts = [[5, 9, 14, 3], [7, 7, 20], [5, 9, 14, 3]]
    spec = TreeSpec((2, 2), segment_tokens=4, temperature=0.0)
    sampler = TreeSampler(tree_model, tok, pool_tokens=1024, ignore_eos=True)
    if not exact(family):
        with pytest.raises(UnsupportedModelError, match=FAMILIES[family][3]):
            sampler.sample(prompts, spec)
        assert sampler.pool.free_tokens + sampler.cache.total_cached_tokens == sampler.pool.capacity_tokens
        return
    greedy = sampler.sample(prompts, spec)
    reference = ReferenceTreeSampler(plain, tok).sample(prompts, spec)
    for a, b in zip(greedy, reference, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist(), family
    sampled = sampler.sample(prompts, TreeSpec((2, 2), segment_tokens=4, temperature=1.0), seeds=[0, 1, 2])
    with torch.no_grad():
        for tree in sampled:
            for leaf in tree.leaves():
                ids = tree.path_token_ids(int(leaf))
                expected = path_logprobs(plain, ids)
                nodes = tree.path(int(leaf))[1:]
                got = np.concatenate([tree.token_logprobs[tree.offsets[n] : tree.offsets[n + 1]] for n in nodes])
                torch.testing.assert_close(
                    torch.as_tensor(got, dtype=torch.float32),
                    expected[len(tree.prompt_ids) - 1 :],
                    rtol=1e-4,
                    atol=1e-4,
                )


def test_trainer_refuses_a_window_shorter_than_its_paths_before_any_work(tmp_path):
    from treerpo.config import ConfigError, make_config
    from treerpo.models.tiny import load_model_and_tokenizer
    from treerpo.training.trainer import Trainer

    model, tok = load_model_and_tokenizer()
    model.config.use_sliding_window, model.config.sliding_window = True, 24
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 24
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"sliding window \(24 positions\) is shorter than a path"):
        Trainer(make_config({"model": str(tmp_path / "m"), "output_dir": str(tmp_path / "out")}))
