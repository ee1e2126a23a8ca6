"""A step's draws: the engine's batched draw against numpy in fp64, and the LM head + draw in row chunks."""

import numpy as np
import pytest
import torch

from treerpo.engine.sampling import SamplingParams, draw, draw_bytes_per_logit
from treerpo.engine.step_draw import draw_step, rows_per_chunk
from treerpo.engine.tree_sampler import TreeSampler
from treerpo.models.tiny import build_char_tokenizer, build_tiny_model
from treerpo.policy.lm_head import LMHead
from treerpo.runtime.finite_guard import NonFiniteError
from treerpo.tree import TreeSpec


def reference(logits_row: np.ndarray, temperature: float, us) -> tuple[list, list, float]:
    """Tokens (inverse CDF at each uniform), their log-probs and the entropy, in numpy float64."""
    z = logits_row.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    cdf = np.cumsum(p)
    tokens = [int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(p) - 1)) for u in us]
    logp = z - z.max() - np.log(p.sum())
    q = p / p.sum()
    entropy = -float(np.sum(q[q > 0] * logp[q > 0]))
    return tokens, [logp[t] for t in tokens], entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draw_is_the_fp64_inverse_cdf_with_exact_logprobs_and_entropy(temperature):
    torch.manual_seed(0)
    logits = torch.randn(12, 3000) * 3
    logits[2, 100:2000] = float("-inf")  # masked tokens: no mass, no entropy
    u = torch.rand(12, 3, dtype=torch.float64)
    tokens, logprobs, bad, entropies = draw(logits, SamplingParams(temperature=temperature), u, entropy=True)
    assert not bool(bad)
    for r in range(12):
        want_tokens, want_logprobs, want_entropy = reference(logits[r].numpy(), temperature, u[r].tolist())
        assert tokens[r].tolist() == want_tokens
        np.testing.assert_allclose(logprobs[r].numpy(), want_logprobs, rtol=1e-6, atol=1e-6)
        assert entropies[r].item() == pytest.approx(want_entropy, rel=1e-6, abs=1e-6)
    assert not ((tokens[2] >= 100) & (tokens[2] < 2000)).any()


def test_greedy_draw_takes_the_argmax_with_its_logprob():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, float("-inf")]])
    tokens, logprobs, bad, entropies = draw(logits, SamplingParams(temperature=0.0), torch.zeros(2, 2), entropy=True)
    assert tokens.tolist() == [[1, 1], [0, 0]]
    expected = torch.log_softmax(logits, -1)[[0, 1], [1, 0]]
    torch.testing.assert_close(logprobs[:, 0], expected)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropies, -(p * p.log()).nan_to_num(0.0).sum(-1))
    assert not bool(bad)


PARAMS = {
    "sampled": SamplingParams(),
    "greedy": SamplingParams(temperature=0.0),
    "top_p": SamplingParams(top_p=0.9),
    "top_k": SamplingParams(top_k=5),
}


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("kind", sorted(PARAMS))
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_draw_flags_nan_and_positive_infinity_only(poison, kind, entropy):
    params = PARAMS[kind]
    logits = torch.randn(4, 50)
    logits[3, 7] = float("-inf")
    assert not bool(draw(logits, params, torch.rand(4, 2, dtype=torch.float64), entropy)[2])
    logits[1, 9] = poison
    tokens, _, bad, _ = draw(logits, params, torch.rand(4, 2, dtype=torch.float64), entropy)
    assert bool(bad)
    assert ((tokens >= 0) & (tokens < 50)).all()  # garbage the caller refuses, but never out of range


def test_rows_per_chunk_fits_the_budget():
    assert rows_per_chunk(1000, 10 * 1000 * 12, 12) == 10
    assert rows_per_chunk(1000, 10 * 1000 * 12 - 1, 12) == 9
    assert rows_per_chunk(151_936, 1, 12) == 1  # never less than a row
    assert draw_bytes_per_logit(SamplingParams(), False) == 12  # fp32 logits + one fp64 working copy
    assert draw_bytes_per_logit(SamplingParams(), True) == draw_bytes_per_logit(SamplingParams(0.0), True) == 20
    assert draw_bytes_per_logit(SamplingParams(top_p=0.9), False) > 20


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_peak_memory_of_a_draw_is_within_its_bytes_per_logit(kind):
    """The allocator's peak during ``draw`` (torch's CPU profiler), over the fp32 logits already held, stays
    within ``draw_bytes_per_logit`` minus those 4 bytes: the chunk sizes built on it hold."""
    from torch.profiler import ProfilerActivity, profile

    rows, vocab = 64, 20_000
    logits = torch.randn(rows, vocab)
    params = PARAMS[kind]
    for entropy in (False, True):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            draw(logits, params, torch.rand(rows, 2, dtype=torch.float64), entropy)
        live, peak = 0, 0  # each allocation and each free is counted once, on the innermost event holding it
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            live += 0 if event.cpu_children else event.cpu_memory_usage
            peak = max(peak, live)
        assert peak <= rows * vocab * (draw_bytes_per_logit(params, entropy) - 4) * 1.05, (kind, entropy, peak)


class CountingHead(LMHead):
    """The tiny model's head, recording the rows of every call."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def logits(self, hidden):
        self.calls.append(hidden.shape[0])
        return super().logits(hidden)


def test_chunked_truncated_draws_equal_one_call():
    """top-p in chunks of 2 rows: the draws of the logits of every row at once."""
    torch.manual_seed(1)
    model = build_tiny_model(build_char_tokenizer(), seed=1)
    head = LMHead(model)
    hidden = torch.randn(7, model.config.hidden_size) * 4
    rows, u = np.arange(7), np.random.default_rng(1).random((7, 2))
    params = SamplingParams(top_p=0.8)
    chunked = draw_step(
        head,
        hidden,
        rows,
        u,
        2,
        params,
        entropy=True,
        memory_bytes=2 * head.weight.shape[0] * draw_bytes_per_logit(params, True),
    )
    whole = draw(head.logits(hidden).detach(), params, torch.from_numpy(u), entropy=True)
    assert chunked[0].tolist() == whole[0].tolist()
    np.testing.assert_allclose(chunked[1], whole[1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(chunked[2], whole[3].numpy(), rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chunked_draws_equal_the_draws_of_one_head_call(temperature):
    """Rows in chunks of 3 (hidden rows repeated, as prefill maps trees to one prompt's row): the same tokens as
    the logits of every row at once, log-probs of those logits, one head call per chunk."""
    torch.manual_seed(0)
    model = build_tiny_model(build_char_tokenizer(), seed=1)
    head = CountingHead(model)
    vocab = head.weight.shape[0]
    hidden = torch.randn(5, model.config.hidden_size) * 4
    rows = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 1, 0])
    u = np.random.default_rng(0).random((len(rows), 3))
    params = SamplingParams(temperature=temperature)
    tokens, logprobs, entropies = draw_step(
        head, hidden, rows, u, 3, params, entropy=True, memory_bytes=3 * vocab * draw_bytes_per_logit(params, True)
    )
    assert head.calls == [3, 3, 3, 2]
    logits = (hidden @ head.weight.t()).detach().double().numpy()[rows]
    for r in range(len(rows)):
        if temperature == 0:
            want = [int(logits[r].argmax())] * 3
            z = logits[r]
        else:
            want = reference(logits[r], temperature, u[r])[0]
            z = logits[r] / temperature
        assert tokens[r].tolist() == want
        np.testing.assert_allclose(
            logprobs[r], z[want] - z.max() - np.log(np.exp(z - z.max()).sum()), rtol=1e-5, atol=1e-5
        )
        assert entropies[r] == pytest.approx(
            reference(logits[r], 1.0 if temperature == 0 else temperature, [])[2], rel=1e-5, abs=1e-5
        )


def test_non_finite_logits_in_a_later_chunk_are_refused():
    model = build_tiny_model(build_char_tokenizer(), seed=1)
    head = LMHead(model)
    hidden = torch.randn(6, model.config.hidden_size)
    hidden[5, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite"):
        draw_step(
            head,
            hidden,
            np.arange(6),
            None,
            1,
            SamplingParams(),
            entropy=False,
            memory_bytes=2 * head.weight.shape[0] * draw_bytes_per_logit(SamplingParams(), False),
        )


@pytest.mark.parametrize(
    "spec",
    [
        TreeSpec((3, 2), segment_tokens=5, temperature=1.0),
        TreeSpec((2, 2), segment_tokens=6, temperature=1.0, fork_entropy=1.5, min_segment_tokens=2),
    ],
    ids=["plain", "fork_entropy"],
)
def test_engine_with_a_tiny_draw_budget_samples_the_same_trees(spec):
    """Chunks of one row against the default budget (every row at once): the same seeded trees, same log-probs."""
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=2).eval()
    prompts = [tok(p)["input_ids"] for p in ("12+3-4=", "7-19+2+20=", "1+1=")]
    whole = TreeSampler(model, tok, pool_tokens=4096).sample(prompts, spec, seeds=[0, 1, 2])
    one_row = TreeSampler(model, tok, pool_tokens=4096, draw_memory_bytes=1)
    chunked = one_row.sample(prompts, spec, seeds=[0, 1, 2])
    for a, b in zip(whole, chunked, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert a.parent.tolist() == b.parent.tolist()
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="draw_memory_bytes must be a positive number of bytes"):
        TreeSampler(model, tok, pool_tokens=4096, draw_memory_bytes=0)
