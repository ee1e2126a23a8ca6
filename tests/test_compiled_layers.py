"""The engine with compiled decoder layers: the trees of the model's own code, bounded recompiles, a safe fallback."""

import numpy as np
import pytest
import torch

from helpers import tiny_model
from treerpo.engine import compiled_layers
from treerpo.engine.tree_sampler import TreeSampler
from treerpo.models.tiny import build_char_tokenizer
from treerpo.tree import TreeSpec


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # recompiles() counts the process's graphs: this test's only
    compiled_layers._COMPILED.clear()
    yield
    torch._dynamo.reset()
    compiled_layers._COMPILED.clear()


def rollouts(sampler, tok):
    prompts = [tok(p)["input_ids"] for p in ("12+3=", "7-4=", "5+5-2=")]
    greedy = sampler.sample(prompts, TreeSpec((2, 2), segment_tokens=4, temperature=0.0))
    sampled = sampler.sample(prompts, TreeSpec((3, 2), segment_tokens=5, temperature=1.0), seeds=[0, 1, 2])
    return greedy + sampled


def test_compiled_engine_samples_the_trees_of_the_models_own_code():
    """fp32: greedy and seeded trees token for token, sampled-token log-probs within 1e-5; the layers' graphs
    compiled once for the first shapes and once with the row count symbolic, for every layer of the model."""
    tok = build_char_tokenizer()
    eager = rollouts(TreeSampler(tiny_model(vocab=len(tok), seed=1), tok, pool_tokens=1024), tok)
    sampler = TreeSampler(tiny_model(vocab=len(tok), seed=1), tok, pool_tokens=1024, compile=True)
    before = compiled_layers.recompiles()
    compiled = rollouts(sampler, tok)
    assert sampler.runner.compiled.active, sampler.runner.compiled.failed
    for a, b in zip(eager, compiled, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist() and a.parent.tolist() == b.parent.tolist()
        np.testing.assert_allclose(b.token_logprobs, a.token_logprobs, rtol=1e-5, atol=1e-5)
    graphs = compiled_layers.recompiles() - before
    assert 0 < graphs <= 4, graphs  # two graphs a layer class (before and after the attention), at most twice


def test_compiled_code_stays_out_of_training_and_plain_forwards():
    tok = build_char_tokenizer()
    model = tiny_model(vocab=len(tok), seed=1)
    ids = torch.randint(0, len(tok), (1, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    TreeSampler(model, tok, pool_tokens=256, compile=True)
    graphs = compiled_layers.recompiles()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    model(input_ids=ids).logits.sum().backward()
    assert torch.equal(before, after) and compiled_layers.recompiles() == graphs


def test_a_compile_that_fails_falls_back_with_one_warning(monkeypatch):
    tok = build_char_tokenizer()

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no backend for this")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    eager = rollouts(TreeSampler(tiny_model(vocab=len(tok), seed=1), tok, pool_tokens=1024), tok)
    sampler = TreeSampler(tiny_model(vocab=len(tok), seed=1), tok, pool_tokens=1024, compile=True)
    with pytest.warns(UserWarning, match="compiled decoder layers failed.*no backend for this") as caught:
        fallback = rollouts(sampler, tok)
    assert len([w for w in caught if "compiled decoder layers" in str(w.message)]) == 1
    assert not sampler.runner.compiled.active
    for a, b in zip(eager, fallback, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()


def test_a_training_run_with_compile_compiles_once_and_trains_as_eager(tmp_path):
    """``--compile``: 6 steps of the embedded task's trainer (rollouts between optimizer steps, evaluations by
    generate) compile the layers' graphs once, fall back nowhere, and log the eager run's metrics."""
    from test_training import SMALL

    from treerpo.config import make_config
    from treerpo.training.trainer import Trainer

    def train(out, compile):
        config = make_config({**SMALL, "output_dir": str(out), "max_steps": 6, "eval_every": 3, "compile": compile})
        trainer = Trainer(config, log=lambda *a: None)
        try:
            return trainer, trainer.train()
        finally:
            trainer.close()

    trainer, compiled = train(tmp_path / "compiled", True)
    assert trainer.sampler.runner.compiled.active and 0 < compiled["compile"]["graphs"] <= 4  # reset: fixture
    assert compiled["compile"]["compile_s"] > 0 and compiled["compile"]["fell_back"] is None
    _, eager = train(tmp_path / "eager", False)
    for key in ("tokens_generated", "tokens_trained", "final_eval_accuracy"):
        assert compiled[key] == eager[key], key


def test_compile_needs_the_engine():
    from treerpo.config import ConfigError, make_config

    with pytest.raises(ConfigError, match="compile=True compiles the engine's forwards; it needs sampler=engine"):
        make_config({"compile": True, "sampler": "reference"})


@pytest.mark.parametrize("cascade", [False, True])
def test_padding_rows_never_change_a_real_rows_result(monkeypatch, cascade):
    """Every decode step of a rollout run twice, alone and padded past its bucket: the branches' final hidden states
    agree to fp32 rounding (only the matmuls' row count differs), cascade decode or not."""
    from treerpo.engine import tree_sampler
    from treerpo.engine.step_builder import decode_bucket

    tok = build_char_tokenizer()
    sampler = TreeSampler(tiny_model(vocab=len(tok), seed=1), tok, pool_tokens=1024)
    sampler.pool.reserve_scratch_slot()
    sampler.runner.cascade_min_saved_bytes = 0 if cascade else 1 << 60
    real, errors, shapes = tree_sampler.decode_inputs, [], []

    def twice(live, paths, pool, staging, use_cascade, pad_to=None):
        plain = real(live, paths, pool, staging, use_cascade)
        padded = real(live, paths, pool, staging, use_cascade, decode_bucket(len(live)) + 3)
        alone, beside = sampler.runner.run(plain), sampler.runner.run(padded)
        shapes.append((use_cascade, padded.num_tokens - plain.num_tokens))
        errors.append(float((beside - alone).norm() / alone.norm()))
        return plain

    monkeypatch.setattr(tree_sampler, "decode_inputs", twice)
    rollouts(sampler, tok)
    assert errors and max(errors) < 1e-6
    assert all(c == cascade for c, _ in shapes) and min(p for _, p in shapes) >= 3
