"""Next-token sampling: greedy, truncation, per-row generators, and the sampled distribution itself."""
import pytest
import torch

from treerpo.engine.sampling import SamplingParams, sample_next, truncate_logits


def test_greedy_and_logprob():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tokens, logp = sample_next(logits, SamplingParams(temperature=0.0))
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])


def test_truncation_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(truncate_logits(logits, top_k=2, top_p=1.0)[0, 2:]).all()
    kept = ~torch.isinf(truncate_logits(logits, top_k=0, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 crosses it: two tokens


def test_per_row_generators_reproduce_and_ignore_the_batch():
    logits = torch.randn(5, 50)
    params = SamplingParams(temperature=1.0)
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(5)]  # noqa: E731
    a, _ = sample_next(logits, params, gens())
    b, _ = sample_next(logits, params, gens())
    alone, _ = sample_next(logits[3:4], params, [torch.Generator().manual_seed(3)])
    assert a.tolist() == b.tolist() and a[3] == alone[0]


@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_frequencies_follow_the_distribution(seeded):
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.6, 0.3])
    n = 20000
    logits = torch.log(probs).expand(n, 3)
    gens = [torch.Generator().manual_seed(i) for i in range(n)] if seeded else None
    tokens, logp = sample_next(logits, SamplingParams(temperature=1.0), gens)
    freq = torch.bincount(tokens, minlength=3).float() / n
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    torch.testing.assert_close(logp, torch.log(probs)[tokens])


def test_temperature_scales_the_logprob():
    logits = torch.tensor([[1.0, 2.0]])
    tokens, logp = sample_next(logits, SamplingParams(temperature=0.5), [torch.Generator().manual_seed(0)])
    assert logp.exp().item() == pytest.approx(torch.softmax(logits / 0.5, -1)[0, tokens[0]].item())


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
