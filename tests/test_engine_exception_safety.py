"""An exception inside TreeSampler.sample gives back every slot and lock it took; unannounced weight changes
retire the cached K/V."""

import pytest
import torch

from treerpo.attention import enable_tree_attention
from treerpo.engine import TreeSampler
from treerpo.models.tiny import build_char_tokenizer, build_tiny_model
from treerpo.tree import TreeSpec

PROMPTS = ["12+3-4=", "7-19+2+20=", "1+1=", "12+3-4="]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = build_char_tokenizer()
    return enable_tree_attention(build_tiny_model(tok, seed=3)).eval(), tok


class Boom(Exception):
    pass


def failing_after(forward, calls: int, error=Boom):
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise error("injected")
        return forward(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("share_prefixes", [True, False])
@pytest.mark.parametrize("calls", [0, 1, 3, 7])
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_exception_releases_every_slot_and_lock(model_and_tokenizer, share_prefixes, calls, error):
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    spec = TreeSpec((2, 2, 2), segment_tokens=4)
    sampler = TreeSampler(model, tok, pool_tokens=2048, share_prefixes=share_prefixes)
    sampler.sample(prompts[:1], spec, seeds=[0])  # something cached and unlocked beforehand
    free, cached = sampler.pool.free_tokens, sampler.cache.total_cached_tokens
    real_forward = sampler.runner.run  # every forward of the engine (prefill and decode)
    sampler.runner.run = failing_after(real_forward, calls, error)
    with pytest.raises(error):
        sampler.sample(prompts, spec, seeds=range(len(prompts)))
    sampler.runner.run = real_forward
    sampler.cache.check_invariants()
    assert sampler.cache.evictable_tokens == sampler.cache.matchable_tokens, "a node is still locked"
    assert sampler.pool.free_tokens + sampler.cache.total_cached_tokens == free + cached, "slots leaked"
    sampler.cache.reset()  # refused while anything is locked
    assert sampler.pool.free_tokens == sampler.pool.capacity_tokens
    again = sampler.sample(prompts, spec, seeds=range(len(prompts)))  # and the sampler still works
    assert len(again) == len(prompts)


def test_unannounced_weight_change_retires_cached_kv(model_and_tokenizer):
    model, tok = model_and_tokenizer
    model = build_tiny_model(tok, seed=4)
    enable_tree_attention(model).eval()
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    spec = TreeSpec((2,), segment_tokens=3, temperature=0.0)
    sampler = TreeSampler(model, tok, pool_tokens=1024)
    sampler.sample(prompts, spec)
    assert sampler.cache.matchable_tokens > 0
    version = sampler.cache.policy_version
    with torch.no_grad():  # what an optimizer step does, without on_weights_updated()
        for p in model.parameters():
            p.mul_(1.5)
    fresh = TreeSampler(model, tok, pool_tokens=1024).sample(prompts, spec)
    got = sampler.sample(prompts, spec)
    assert sampler.cache.policy_version == version + 1
    assert [t.token_ids.tolist() for t in got] == [t.token_ids.tolist() for t in fresh]
    sampler.sample(prompts, spec)
    assert sampler.cache.policy_version == version + 1, "no change, no bump"
