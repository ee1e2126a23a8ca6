"""The engine's cached K/V never outlives the weights that computed it, whatever changes them: fused, foreach and
for-loop AdamW and SGD (a fused step leaves ``param._version`` unchanged), with or without an optimizer hook."""

import copy

import numpy as np
import pytest
import torch

from treerpo.attention import enable_tree_attention
from treerpo.engine.tree_sampler import TreeSampler
from treerpo.models.tiny import load_model_and_tokenizer
from treerpo.policy.logprobs import packed_logprobs
from treerpo.tree import TreeSpec
from treerpo.trees.packing import pack_trees

PROMPTS = ["12+3-4=", "7-19+2+20=", "12+3-4="]  # a prompt seen twice: its prefix is served from the radix cache
SPEC = TreeSpec((2, 2), segment_tokens=5, temperature=1.0)

OPTIMIZERS = {
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True),
    "adamw_for_loop": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=False),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-1),
}


def logprob_error(trees, model) -> float:
    """Largest difference between the engine's log-prob of each sampled token and a fresh forward of ``model``."""
    batch = pack_trees(trees)
    rows = torch.nonzero(batch.prev_index >= 0).squeeze(1)
    rows = rows[batch.node_index[rows] > 0]
    with torch.no_grad():
        fresh = packed_logprobs(model, batch, rows).numpy()
    engine = np.array(
        [
            trees[t].token_logprobs[trees[t].offsets[n] + k]
            for t, n, k in zip(
                batch.tree_index[rows].tolist(),
                batch.node_index[rows].tolist(),
                _rank_within_node(batch, rows),
                strict=True,
            )
        ]
    )
    return float(np.abs(engine - fresh).max())


def _rank_within_node(batch, rows) -> list[int]:
    """Each row's index among its node's tokens (rows of a node are consecutive in the packed order)."""
    keys = list(zip(batch.tree_index[rows].tolist(), batch.node_index[rows].tolist(), strict=True))
    ranks, seen = [], {}
    for key in keys:
        ranks.append(seen.get(key, 0))
        seen[key] = ranks[-1] + 1
    return ranks


def step(model, optimizer) -> None:
    """One optimizer step on a loss that moves every weight."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    optimizer.zero_grad()
    model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("hooked", [True, False], ids=["hook_only", "fingerprint_only"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sampled_logprobs_equal_a_fresh_copy_after_every_step(name, hooked):
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer()
    model = enable_tree_attention(model).train()
    optimizer = OPTIMIZERS[name](model.parameters())
    sampler = TreeSampler(model, tok, pool_tokens=4096)
    if hooked:  # the hook alone: the fingerprint check is switched off
        sampler.follow_optimizer(optimizer)
        sampler.weights.changed = lambda: False
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    sampler.sample(prompts, SPEC, seeds=[0, 1, 2])  # caches the prompts' K/V
    for _ in range(2):
        step(model, optimizer)
        trees = sampler.sample(prompts, SPEC, seeds=[3, 4, 5])
        assert logprob_error(trees, copy.deepcopy(model).eval()) < 1e-4


def test_a_write_that_bumps_no_version_is_still_seen():
    """``.data`` writes change no ``_version`` and no pointer: the weights' fingerprint still retires the cache."""
    model, tok = load_model_and_tokenizer()
    model = enable_tree_attention(model).eval()
    sampler = TreeSampler(model, tok, pool_tokens=4096)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    sampler.sample(prompts, SPEC, seeds=[0, 1, 2])
    versions = [p._version for p in model.parameters()]
    for p in model.parameters():
        p.data.mul_(1.05)
    assert [p._version for p in model.parameters()] == versions
    trees = sampler.sample(prompts, SPEC, seeds=[3, 4, 5])
    assert logprob_error(trees, copy.deepcopy(model)) < 1e-4


def test_an_optimizer_without_torch_hooks_is_left_to_the_fingerprint():
    """DeepSpeed's optimizer (inside accelerate's wrapper) is no torch Optimizer: nothing to hook, no error."""
    model, tok = load_model_and_tokenizer()
    sampler = TreeSampler(enable_tree_attention(model), tok, pool_tokens=1024)

    class NotTorch:
        def step(self):
            pass

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, optimizer):
            self.optimizer = optimizer

    sampler.follow_optimizer(Wrapper(NotTorch()))
    sampler.follow_optimizer(NotTorch())


def test_follow_optimizer_reaches_the_optimizer_inside_a_wrapper():
    """accelerate's AcceleratedOptimizer (and similar) wraps the torch optimizer that actually steps."""
    model, tok = load_model_and_tokenizer()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, optimizer):
            self.optimizer = optimizer

    sampler = TreeSampler(enable_tree_attention(model), tok, pool_tokens=1024)
    sampler.follow_optimizer(Wrapper(inner))
    sampler.follow_optimizer(inner)  # once per optimizer, however often it is asked
    before = sampler.cache.policy_version
    step(model, inner)
    assert sampler.cache.policy_version == before + 1
