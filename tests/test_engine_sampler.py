"""The engine's TreeSampler against the reference sampler (the oracle) and against a full forward."""

import numpy as np
import pytest
import torch

from treerpo.attention import enable_tree_attention, paged, registry
from treerpo.engine.kv_pool import RequestTooLarge
from treerpo.engine.tree_sampler import TreeSampler
from treerpo.models.tiny import build_char_tokenizer, build_tiny_model, load_model_and_tokenizer
from treerpo.policy.logprobs import packed_logprobs
from treerpo.sampling.reference_sampler import ReferenceTreeSampler
from treerpo.tree import TreeSpec
from treerpo.trees.packing import pack_trees

PROMPTS = ["12+3-4=", "7-19+2+20=", "1+1=", "20-20-20-20=", "12+3-4="]


@pytest.fixture(scope="module", params=["random", "embedded"])
def model_and_tokenizer(request):
    if request.param == "random":
        tok = build_char_tokenizer()
        model = build_tiny_model(tok, seed=3)
    else:
        model, tok = load_model_and_tokenizer()
    return enable_tree_attention(model).eval(), tok


def cascade_sampler(model, tok, **kwargs) -> TreeSampler:
    """A TreeSampler whose decode steps always read the prefix siblings share once per group (the runner's
    threshold of bytes saved would leave the cascade off for models this small)."""
    sampler = TreeSampler(model, tok, **kwargs)
    sampler.runner.cascade_min_saved_bytes = 0
    return sampler


def same_tree(a, b):
    assert a.parent.tolist() == b.parent.tolist()
    assert a.offsets.tolist() == b.offsets.tolist()
    assert a.token_ids.tolist() == b.token_ids.tolist()
    assert a.finished.tolist() == b.finished.tolist()


@pytest.mark.parametrize("branching,segment", [((2, 3, 2), 5), ((3,), 14), ((2, 2, 2, 2), 3)])
def test_greedy_trees_equal_the_reference(model_and_tokenizer, branching, segment):
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    spec = TreeSpec(branching, segment_tokens=segment, temperature=0.0)
    expected = ReferenceTreeSampler(model, tok).sample(prompts, spec)
    got = cascade_sampler(model, tok, pool_tokens=4096).sample(prompts, spec)
    for a, b in zip(expected, got, strict=True):
        same_tree(a, b)


def test_seeded_trees_do_not_depend_on_the_batch(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    spec = TreeSpec((3, 2), segment_tokens=6, temperature=1.0)
    sampler = TreeSampler(model, tok, pool_tokens=4096)
    batch = sampler.sample(prompts, spec, seeds=[5, 6, 7])
    again = sampler.sample(prompts, spec, seeds=[5, 6, 7])
    alone = sampler.sample(prompts[1:2], spec, seeds=[6])
    for a, b in zip(batch, again, strict=True):
        same_tree(a, b)
    same_tree(batch[1], alone[0])
    assert batch[0].token_ids.tolist() != sampler.sample(prompts[:1], spec, seeds=[99])[0].token_ids.tolist()


def test_sampled_logprobs_match_a_full_forward(model_and_tokenizer):
    model, tok = model_and_tokenizer
    spec = TreeSpec((2, 2, 2), segment_tokens=6, temperature=1.0)
    trees = cascade_sampler(model, tok, pool_tokens=4096).sample(
        [tok(p)["input_ids"] for p in PROMPTS[:3]], spec, seeds=[1, 2, 3]
    )
    batch = pack_trees(trees)
    rows = torch.nonzero(batch.prev_index >= 0).squeeze(1)
    rows = rows[batch.node_index[rows] > 0]  # generated tokens
    with torch.no_grad():
        full = packed_logprobs(model, batch, rows)
    sampled = torch.tensor(np.concatenate([t.token_logprobs[t.offsets[1] :] for t in trees]), dtype=torch.float32)
    # packing visits nodes depth-first, trees store them breadth-first: compare per (tree, node)
    by_key = {}
    for r, lp in zip(rows.tolist(), full.tolist(), strict=True):
        by_key.setdefault((int(batch.tree_index[r]), int(batch.node_index[r])), []).append(lp)
    for ti, t in enumerate(trees):
        for node in range(1, t.num_nodes):
            got = t.token_logprobs[t.offsets[node] : t.offsets[node + 1]]
            np.testing.assert_allclose(got, by_key[(ti, node)], atol=2e-5, rtol=1e-5)
    assert len(sampled) == len(full)


def test_a_batch_larger_than_the_pool_waits_and_matches(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    spec = TreeSpec((2, 2), segment_tokens=6, temperature=0.0)
    one_tree = max(len(p) for p in prompts) + spec.max_generated_tokens
    small = TreeSampler(model, tok, pool_tokens=one_tree + 8)  # room for one tree at a time
    got = small.sample(prompts, spec)
    expected = ReferenceTreeSampler(model, tok).sample(prompts, spec)
    for a, b in zip(expected, got, strict=True):
        same_tree(a, b)
    assert small.pool.peak_used_pages <= one_tree + 8
    small.cache.reset()
    assert small.pool.free_tokens == small.pool.capacity_tokens  # nothing leaked


def test_seeded_trees_admitted_while_others_decode_equal_those_sampled_alone(model_and_tokenizer):
    """A pool of about two and a half trees: trees join while others are mid-segment (continuous batching), and each
    is still the tree its seed gives alone. Common tokens end a segment, so that trees end at different steps."""
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    spec = TreeSpec((3, 2), segment_tokens=5, temperature=1.0)
    one_tree = max(len(p) for p in prompts) + spec.max_generated_tokens
    ends = tok.convert_tokens_to_ids(list("0123+"))
    sampler = TreeSampler(model, tok, pool_tokens=one_tree * 5 // 2, eos_ids=ends)
    sampler.profile = True
    got = sampler.sample(prompts, spec, seeds=range(10, 15))
    steps = sampler.step_records
    assert any(r["kind"] == "prefill" and steps[i - 1]["branches"] > 0 for i, r in enumerate(steps) if i), (
        "no tree was admitted while others were decoding"
    )
    for i, prompt in enumerate(prompts):
        alone = TreeSampler(model, tok, pool_tokens=4096, eos_ids=ends).sample([prompt], spec, seeds=[10 + i])[0]
        same_tree(got[i], alone)
    sampler.cache.reset()
    assert sampler.pool.free_tokens == sampler.pool.capacity_tokens


def test_a_tree_that_can_never_fit_is_refused(model_and_tokenizer):
    model, tok = model_and_tokenizer
    spec = TreeSpec((4, 4), segment_tokens=8)
    with pytest.raises(RequestTooLarge, match="larger pool"):
        TreeSampler(model, tok, pool_tokens=64).sample([tok("1+2=")["input_ids"]], spec)


def test_identical_prompts_are_prefilled_once(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = tok("12+3-4=")["input_ids"]
    spec = TreeSpec((2,), segment_tokens=1, temperature=0.0)  # one token per branch: no decode forward
    sampler = TreeSampler(model, tok, pool_tokens=1024)
    sampler.sample([prompt] * 4, spec)
    assert sampler.runner.forward_tokens == len(prompt)
    sampler.sample([prompt], spec)  # the radix cache holds it: only the last token is recomputed
    assert sampler.runner.forward_tokens == len(prompt) + 1
    sampler.on_weights_updated()  # new weights: nothing old is reused
    sampler.sample([prompt], spec)
    assert sampler.runner.forward_tokens == 2 * len(prompt) + 1


def test_without_prefix_sharing_the_trees_are_the_same(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    spec = TreeSpec((2, 2), segment_tokens=5, temperature=1.0)
    shared = TreeSampler(model, tok, pool_tokens=4096)
    unshared = TreeSampler(model, tok, pool_tokens=4096, share_prefixes=False)
    for a, b in zip(
        shared.sample(prompts, spec, seeds=range(5)), unshared.sample(prompts, spec, seeds=range(5)), strict=True
    ):
        same_tree(a, b)
    assert unshared.runner.forward_tokens > shared.runner.forward_tokens  # the repeated prompt is computed twice
    assert unshared.pool.free_tokens == unshared.pool.capacity_tokens  # every slot returned


def test_stop_string_ends_a_branch(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = tok("12+3-4=")["input_ids"]
    spec = TreeSpec((2,), segment_tokens=20, temperature=0.0)
    full = ReferenceTreeSampler(model, tok).sample([prompt], spec)[0]
    text = tok.decode(full.segment(1))
    stopped = TreeSampler(model, tok, pool_tokens=1024, stop_strings=[";"]).sample([prompt], spec)[0]
    got = tok.decode(stopped.segment(1))
    if ";" in text:
        assert got == text[: text.index(";") + 1] and stopped.finished[1]
    else:
        assert got == text


def test_trees_whose_branches_all_end_at_the_fork_are_released(model_and_tokenizer):
    """One-token segments end every branch inside the prefill's fork: trees must still finish and unlock."""
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    spec = TreeSpec((4,), segment_tokens=1, temperature=1.0)
    sampler = TreeSampler(model, tok, pool_tokens=max(map(len, prompts)) + 6)  # one tree at a time
    trees = sampler.sample(prompts, spec, seeds=[0, 1, 2])
    assert [len(t.leaves()) for t in trees] == [4, 4, 4]
    sampler.cache.reset()  # refuses while any tree still holds a lock
    assert sampler.pool.free_tokens == sampler.pool.capacity_tokens


@pytest.mark.parametrize("branching,segment,temperature", [((2, 3, 2), 5, 0.0), ((3, 2), 7, 1.0)])
def test_cascade_on_and_off_sample_the_same_trees(model_and_tokenizer, monkeypatch, branching, segment, temperature):
    """Siblings reading their shared path once (cascade) or each over its whole path: same tokens, same log-probs."""
    model, tok = model_and_tokenizer
    grouped = []

    def spy(module, query, key, value, meta, scale):
        grouped.append(meta.groups is not None)
        return paged.paged_attention_torch(module, query, key, value, meta, scale)

    monkeypatch.setitem(registry._BACKENDS["paged"], "torch", spy)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    spec = TreeSpec(branching, segment_tokens=segment, temperature=temperature)
    trees = {}
    for cascade in (True, False):
        grouped.clear()
        sampler = cascade_sampler(model, tok, pool_tokens=4096, cascade=cascade)
        trees[cascade] = sampler.sample(prompts, spec, seeds=range(len(prompts)))
        decode_calls = sum(grouped)
        assert decode_calls > 0 if cascade else decode_calls == 0
    for a, b in zip(trees[True], trees[False], strict=True):
        same_tree(a, b)
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5, rtol=1e-5)


def test_entropy_triggered_forks_fork_at_the_first_uncertain_token(model_and_tokenizer):
    """With fork_entropy, a node above the last level ends its segment at the first length >= min_segment_tokens
    whose next-token entropy reaches the threshold (else at segment_tokens), checked against the entropies of a
    plain forward of each path; leaves run to segment_tokens; the tree keeps its shape."""
    model, tok = model_and_tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    plain = TreeSpec((2, 2, 2), segment_tokens=6, temperature=1.0)

    def log_softmax(ids):
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.as_tensor(ids)[None]).logits[0].float(), -1)

    def entropies(ids):  # entropy (nats) of the next token after each prefix of ids
        logp = log_softmax(ids)
        return -(logp.exp() * logp).sum(-1).numpy()

    seen = np.concatenate(
        [
            entropies(t.path_token_ids(int(leaf)))[len(t.prompt_ids) :]
            for t in TreeSampler(model, tok, ignore_eos=True).sample(prompts, plain, seeds=[0, 1, 2])
            for leaf in t.leaves()
        ]
    )
    threshold = float(np.quantile(seen, 0.8))
    spec = TreeSpec((2, 2, 2), segment_tokens=6, temperature=1.0, fork_entropy=threshold, min_segment_tokens=2)
    trees = TreeSampler(model, tok, ignore_eos=True).sample(prompts, spec, seeds=[0, 1, 2])
    early = full = 0
    for tree in trees:
        assert sorted(np.bincount(tree.depth).tolist()) == [1, 2, 4, 8]  # the shape is kept
        for node in range(1, tree.num_nodes):
            length = len(tree.segment(node))
            path = tree.path_token_ids(node)  # the sampled log-probs read the right (shorter) parent paths
            expected = log_softmax(path)[len(path) - length - 1 : -1].gather(
                1, torch.as_tensor(path[-length:])[:, None]
            )
            np.testing.assert_allclose(
                tree.token_logprobs[tree.offsets[node] : tree.offsets[node + 1]], expected.squeeze(1).numpy(), atol=1e-4
            )
            if tree.depth[node] == spec.depth:
                assert length == spec.segment_tokens
                continue
            h = entropies(path)[len(path) - length - 1 :]  # h[n]: after n tokens of this segment
            below = [n for n in range(spec.min_segment_tokens, length) if abs(h[n] - threshold) > 1e-4]
            assert all(h[n] < threshold for n in below), (node, h, threshold)
            if length < spec.segment_tokens:
                early += 1
                assert h[length] > threshold - 1e-4, (node, length, h, threshold)
            else:
                full += 1
    assert early and full, "the threshold should give both early forks and full segments"
    with pytest.raises(ValueError, match="engine sampler only"):
        ReferenceTreeSampler(model, tok).sample(prompts, spec)
