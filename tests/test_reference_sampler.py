"""The reference sampler builds the tree shape asked for, continues each path, and refuses prompts that do not fit."""

import numpy as np
import pytest
import torch

from helpers import tiny_model
from treerpo.models.tiny import build_char_tokenizer, build_tiny_model
from treerpo.sampling.prompt_rules import PromptTooLongError
from treerpo.sampling.reference_sampler import ReferenceTreeSampler
from treerpo.tree import TreeSpec


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = build_char_tokenizer()
    return build_tiny_model(tok, seed=3).eval(), tok


def test_greedy_tree_paths_equal_one_greedy_generation(model_and_tokenizer):
    """Greedy: every child is the same continuation, so each leaf path is the plain greedy answer, cut into segments."""
    model, tok = model_and_tokenizer
    prompts = [tok("12+3-4=")["input_ids"], tok("7-19+2+20=")["input_ids"]]
    spec = TreeSpec((2, 3, 2), segment_tokens=5, temperature=0.0)
    trees = ReferenceTreeSampler(model, tok).sample(prompts, spec)
    for prompt, tree in zip(prompts, trees, strict=True):
        ids = torch.tensor([prompt])
        full = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=15,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        expected = full[0, len(prompt) :].tolist()
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id) + 1]
        for leaf in tree.leaves():
            assert tree.path_token_ids(leaf, include_prompt=False).tolist() == expected


def test_sampled_tree_shape_and_segments(model_and_tokenizer):
    model, tok = model_and_tokenizer
    torch.manual_seed(0)
    spec = TreeSpec((3, 2), segment_tokens=4, temperature=1.0)
    trees = ReferenceTreeSampler(model, tok).sample([tok("1+2=")["input_ids"]] * 3, spec)
    for tree in trees:
        assert (tree.parent[1:] < np.arange(1, tree.num_nodes)).all()
        assert len(tree.children(0)) == 3
        for node in range(1, tree.num_nodes):
            seg = tree.segment(node).tolist()
            assert 1 <= len(seg) <= 4
            assert tree.finished[node] == (seg[-1] == tok.eos_token_id)
            assert tok.eos_token_id not in seg[:-1]  # nothing follows EOS within a segment
            kids = tree.children(node)
            if tree.depth[node] == 1:
                assert len(kids) == (0 if tree.finished[node] else 2)  # a finished branch is a leaf early
            else:
                assert len(kids) == 0


def test_seeded_sampling_is_reproducible(model_and_tokenizer):
    model, tok = model_and_tokenizer
    spec = TreeSpec((2, 2), segment_tokens=6)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(ReferenceTreeSampler(model, tok).sample([tok("3+3=")["input_ids"]], spec)[0])
    assert runs[0].token_ids.tolist() == runs[1].token_ids.tolist()
    assert runs[0].parent.tolist() == runs[1].parent.tolist()


def test_prompt_longer_than_allowed_is_refused_or_truncated(model_and_tokenizer):
    model, tok = model_and_tokenizer
    spec = TreeSpec((2,), segment_tokens=4, max_prompt_tokens=8)
    long_prompt = tok("1+2+3+4+5+6=")["input_ids"]  # 12 tokens
    with pytest.raises(PromptTooLongError, match="prompt 0 has 12 tokens but at most 8 fit"):
        ReferenceTreeSampler(model, tok).sample([long_prompt], spec)
    tree = ReferenceTreeSampler(model, tok, truncate_prompts=True).sample([long_prompt], spec)[0]
    assert tree.prompt_ids.tolist() == long_prompt[-8:]


def test_completion_must_fit_the_context():
    model = tiny_model(vocab=40)  # 256 positions
    tok = build_char_tokenizer()
    spec = TreeSpec((2, 2), segment_tokens=130)
    with pytest.raises(PromptTooLongError, match="leaves no room"):
        ReferenceTreeSampler(model, tok).sample([[5, 6]], spec)
