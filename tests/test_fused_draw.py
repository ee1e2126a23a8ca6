"""The fused Triton draw against the fp64 inverse CDF, and the engine's step with it (the CUDA default).

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` (conftest), at small vocabularies.
"""

import numpy as np
import pytest
import torch
from test_sampling import inverse_cdf_reference
from test_step_draw import reference

from helpers import tiny_model
from treerpo.engine import step_draw
from treerpo.engine.sampling import SamplingParams
from treerpo.engine.sampling_head import SamplingHead
from treerpo.engine.tree_sampler import TreeSampler
from treerpo.kernels.draw import BLOCK, fused_draw, result_columns
from treerpo.models.tiny import build_char_tokenizer
from treerpo.policy.lm_head import LMHead
from treerpo.runtime.finite_guard import NonFiniteError
from treerpo.tree import TreeSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(logits, u, temperature, entropy=True):
    logits, u = logits.to(DEVICE), u.to(DEVICE)
    out = torch.full((len(logits), result_columns(u.shape[1])), float("nan"), dtype=torch.float64, device=DEVICE)
    fused_draw(logits, u, temperature, entropy, out)
    out, k = out.cpu(), u.shape[1]
    return out[:, :k].long(), out[:, k : 2 * k], out[:, 2 * k], out[:, 2 * k + 1]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_draw_is_the_fp64_inverse_cdf(temperature):
    """Tokens, log-probs and entropy of numpy's fp64 computation, across several blocks of the vocabulary and with a
    run of masked (-inf) tokens."""
    torch.manual_seed(0)
    vocab = 2 * BLOCK + 37
    logits = torch.randn(6, vocab) * 3
    logits[2, 100:3000] = float("-inf")
    u = torch.rand(6, 3, dtype=torch.float64)
    tokens, logprobs, bad, entropies = run(logits, u, temperature)
    assert not bad.any()
    for r in range(6):
        want_tokens, want_logprobs, want_entropy = reference(logits[r].numpy(), temperature, u[r].tolist())
        assert tokens[r].tolist() == want_tokens
        np.testing.assert_allclose(logprobs[r].numpy(), want_logprobs, rtol=1e-9, atol=1e-9)
        assert entropies[r].item() == pytest.approx(want_entropy, rel=1e-9, abs=1e-9)
    assert not ((tokens[2] >= 100) & (tokens[2] < 3000)).any()


def test_fused_draw_follows_fp64_next_to_a_cdf_boundary():
    """Uniforms within 1e-10 of a CDF boundary (where an fp32 CDF picks the neighbour): the exact inverse CDF."""
    torch.manual_seed(1)
    logits = torch.randn(1, 5000)
    cdf = np.cumsum(np.exp(logits[0].numpy().astype(np.float64) - logits[0].max().item()))
    boundaries = cdf[[10, 1000, 2500, 4000]] / cdf[-1]
    us = np.concatenate([boundaries - 1e-10, boundaries + 1e-10])
    u = torch.tensor(us, dtype=torch.float64)[None]
    tokens, *_ = run(logits, u, 1.0, entropy=False)
    assert tokens[0].tolist() == [inverse_cdf_reference(logits[0].numpy(), 1.0, x) for x in us]
    assert tokens[0].tolist() == [10, 1000, 2500, 4000, 11, 1001, 2501, 4001]


def test_fused_greedy_draw_takes_the_first_maximum():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [3.0, 0.0, float("-inf"), 1.0]])
    tokens, logprobs, bad, entropies = run(logits, torch.zeros(2, 2, dtype=torch.float64), 0.0)
    assert tokens.tolist() == [[1, 1], [0, 0]]
    expected = torch.log_softmax(logits.double(), -1)[[0, 1], [1, 0]]
    torch.testing.assert_close(logprobs[:, 0], expected)
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(entropies, -(p * p.log()).nan_to_num(0.0).sum(-1))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_fused_draw_flags_nan_and_positive_infinity_only(poison):
    logits = torch.randn(3, 300)
    logits[0, 5] = float("-inf")  # a masked token is fine
    logits[1, 299] = poison
    _, _, bad, _ = run(logits, torch.rand(3, 1, dtype=torch.float64), 1.0)
    assert bad.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fused_step_draws_equal_the_pytorch_step(monkeypatch, temperature):
    """``draw_step`` in chunks of 3 rows with a row index (as prefill maps trees to a prompt's row): the fused path's
    tokens are the PyTorch path's, its log-probs and entropies those values in fp64."""
    torch.manual_seed(0)
    model = tiny_model(vocab=300).to(DEVICE)
    head = SamplingHead(LMHead(model))
    hidden = (torch.randn(5, model.config.hidden_size) * 4).to(DEVICE)
    rows = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 1, 0])
    u = np.random.default_rng(0).random((len(rows), 3))
    params = SamplingParams(temperature=temperature)
    args = (head, hidden, rows, u, 3, params, True, 3 * 300 * 4)
    monkeypatch.setattr(step_draw, "use_fused_draw", lambda device, params, width: False)
    plain = step_draw.draw_step(*args)
    monkeypatch.setattr(step_draw, "use_fused_draw", lambda device, params, width: True)
    fused = step_draw.draw_step(*args)
    assert fused[0].tolist() == plain[0].tolist()
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fused[2], plain[2], rtol=1e-6, atol=1e-6)


def test_fused_step_refuses_non_finite_logits(monkeypatch):
    monkeypatch.setattr(step_draw, "use_fused_draw", lambda device, params, width: True)
    model = tiny_model(vocab=300).to(DEVICE)
    hidden = torch.randn(4, model.config.hidden_size)
    hidden[3, 0] = float("nan")
    hidden = hidden.to(DEVICE)
    with pytest.raises(NonFiniteError, match="not finite"):
        step_draw.draw_step(SamplingHead(LMHead(model)), hidden, None, None, 1, SamplingParams(), False)


def test_engine_with_the_fused_draw_samples_the_same_seeded_trees(monkeypatch):
    """Same seeds, same trees, whichever draw the step runs (entropy-triggered forks included)."""
    tok = build_char_tokenizer()
    prompts = [tok("12+3=")["input_ids"], tok("7-4=")["input_ids"]]
    spec = TreeSpec((2, 2), segment_tokens=5, temperature=1.0, fork_entropy=1.0, min_segment_tokens=2)
    model = tiny_model(vocab=len(tok), seed=2).to(DEVICE)
    monkeypatch.setattr(step_draw, "use_fused_draw", lambda device, params, width: False)
    plain = TreeSampler(model, tok, pool_tokens=512).sample(prompts, spec, seeds=[4, 5])
    monkeypatch.setattr(step_draw, "use_fused_draw", lambda device, params, width: True)
    fused = TreeSampler(model, tok, pool_tokens=512).sample(prompts, spec, seeds=[4, 5])
    for a, b in zip(plain, fused, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist() and a.parent.tolist() == b.parent.tolist()
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=1e-6, atol=1e-6)


def test_a_row_without_a_finite_logit_is_flagged_by_both_draws():
    """All -inf (every token masked) leaves nothing to draw from: flagged, as NaN and +inf are, on both paths."""
    from treerpo.engine.sampling import draw

    logits = torch.randn(3, 200)
    logits[1] = float("-inf")
    u = torch.rand(3, 2, dtype=torch.float64)
    _, _, bad, _ = run(logits, u, 1.0)
    assert bad.tolist() == [0.0, 1.0, 0.0]
    for temperature in (1.0, 0.0):
        assert bool(draw(logits, SamplingParams(temperature=temperature), u)[2])


def test_the_first_use_check_accepts_the_kernel_and_refuses_a_wrong_one(monkeypatch):
    from treerpo.kernels import draw as kernel

    step_draw.fused_draw_works.cache_clear()
    assert step_draw.fused_draw_works(torch.device(DEVICE))
    step_draw.fused_draw_works.cache_clear()
    real = kernel.fused_draw

    def off_by_one(logits, u, temperature, entropy, out):
        real(logits, u, temperature, entropy, out)
        out[:, 0] += 1

    monkeypatch.setattr(kernel, "fused_draw", off_by_one)
    with pytest.warns(UserWarning, match="fused draw is not used.*differ from PyTorch's"):
        assert not step_draw.fused_draw_works(torch.device(DEVICE))
    step_draw.fused_draw_works.cache_clear()


def test_the_cpu_engine_runs_without_triton(tmp_path):
    """An environment without triton (verl's, a CPU install): a rollout on the CPU imports none of the kernels."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.modules['triton'] = None\n"  # any import of triton now raises ImportError
        "sys.path.insert(0, 'tests')\n"
        "from helpers import tiny_model\n"
        "from treerpo.engine.tree_sampler import TreeSampler\n"
        "from treerpo.models.tiny import build_char_tokenizer\n"
        "from treerpo.tree import TreeSpec\n"
        "tok = build_char_tokenizer()\n"
        "trees = TreeSampler(tiny_model(vocab=len(tok)), tok, pool_tokens=256).sample(\n"
        "    [tok('1+2=')['input_ids']], TreeSpec((2, 2), 3, temperature=1.0), seeds=[0])\n"
        "print(len(trees[0].leaves()))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "4"
