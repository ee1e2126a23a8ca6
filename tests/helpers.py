"""Shared builders for tests: random trees and tiny random models."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from treerpo.attention import enable_tree_attention
from treerpo.tree import Tree


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, rel: float, floor: float = 0.0, msg=None):
    """``|actual - expected| <= rel * max|expected| + floor`` everywhere: a tolerance scaled to the whole tensor,
    so that elements near zero (where an element-wise ``rtol`` means nothing) cannot turn a sound result red."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale + floor, msg=msg)


def python_block(path, heading: str) -> str:
    """The first ```python block after ``heading`` in a markdown file (the docs' examples run as tests)."""
    import re
    from pathlib import Path

    section = Path(path).read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def random_tree(
    rng: np.random.Generator,
    num_nodes: int,
    vocab: int = 40,
    prompt_len: int | None = None,
    max_segment: int = 5,
    shape: str = "random",
) -> Tree:
    """A tree of ``num_nodes`` generated nodes; ``shape`` is random, chain or fan (all children of the root)."""
    parents = []
    for n in range(1, num_nodes + 1):
        parents.append({"chain": n - 1, "fan": 0}.get(shape, int(rng.integers(0, n))))
    prompt = rng.integers(3, vocab, size=prompt_len or int(rng.integers(1, 6)))
    segments = [rng.integers(3, vocab, size=int(rng.integers(1, max_segment + 1))) for _ in parents]
    tree = Tree.from_segments(prompt, parents, segments, finished=[False] * len(parents))
    tree.kept = rng.random(tree.num_nodes) < 0.8
    tree.kept[0] = False
    tree.advantage = rng.normal(size=tree.num_nodes)
    return tree


def tiny_model(arch: str = "qwen2", vocab: int = 40, seed: int = 0, tree_attention: bool = True):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = (
        Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
        if arch == "qwen2"
        else LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    )
    model.eval()
    return enable_tree_attention(model) if tree_attention else model


def char_model_folder(folder, extra_chars: str = "", max_positions: int = 256):
    """A tiny random Qwen2 saved with a character tokenizer over printable ASCII plus ``extra_chars``, so that
    natural-language math prompts are representable."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set([chr(c) for c in range(32, 127)] + ["\n"] + list(extra_chars)))
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=max_positions,
            eos_token_id=1,
            pad_token_id=0,
        )
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---- what only tests use: reference views of the engine and the packed batch ----------------------------------
@dataclass
class SequenceStep:
    cached_slots: np.ndarray | torch.Tensor  # int64 [P]: slots of the path already in the pool (positions 0..P-1)
    new_tokens: list[int]
    new_slots: np.ndarray | torch.Tensor  # int64 [len(new_tokens)]: where their K/V go


@dataclass
class SharedPrefixes:
    """Decode steps in groups that share a cached prefix: step i's cached path is
    ``prefixes[group_of_step[i]]`` followed by the step's own ``cached_slots``."""

    prefixes: list  # int64 slot arrays, one per group, none empty
    group_of_step: np.ndarray  # int64 [len(steps)]


@torch.no_grad()
def runner_logits(runner, steps: list[SequenceStep], shared: SharedPrefixes | None = None) -> torch.Tensor:
    """fp32 logits [len(steps), vocab] after each sequence's last new token, through ``ModelRunner.run``. With
    ``shared`` (decode steps), each step's ``cached_slots`` follow its group's shared prefix."""
    from treerpo.engine.step_builder import sequence_inputs

    sequences = [(s.cached_slots, s.new_slots) for s in steps]
    prefixes, group_of_step = (None, None) if shared is None else (shared.prefixes, shared.group_of_step)
    inputs = sequence_inputs(
        runner.pool, sequences, [s.new_tokens for s in steps], runner.device, prefixes, group_of_step
    )
    return runner.head.logits(runner.run(inputs))


def cascade_pays(runner, shared: SharedPrefixes) -> bool:
    """The runner's cascade decision for ``shared``: the prefix keys its steps would read again without it."""
    prefix_len = np.fromiter(map(len, shared.prefixes), dtype=np.int64, count=len(shared.prefixes))
    return runner.cascade_spares_enough(int(prefix_len[shared.group_of_step].sum() - prefix_len.sum()))


def sample_next(logits: torch.Tensor, params, generators=None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B], log-probs [B] in fp32), one row at a time of the engine's sampling rules. With
    ``generators`` each row draws one fp64 uniform from its own generator and takes the fp64 inverse CDF
    (``sampling.inverse_cdf``); without, the rows share torch's global RNG."""
    from treerpo.engine.sampling import check_finite_logits, inverse_cdf, truncate_logits

    logits = logits.float()
    check_finite_logits(logits)
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    scaled = logits / params.temperature
    logprobs = torch.log_softmax(scaled, -1)
    if generators is None:
        probs = truncate_logits(scaled, params.top_k, params.top_p).softmax(-1)
        tokens = torch.multinomial(probs, 1).squeeze(1)
    else:
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in generators])
        tokens = inverse_cdf(logits, params, u[:, None].to(logits.device)).squeeze(1)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def alloc_or_evict(pool, num_tokens: int, evict_fn) -> torch.Tensor:
    """``pool.alloc``, calling ``evict_fn(pages_short)`` until the request fits: ``RequestTooLarge`` at once for
    what can never fit, ``PoolExhausted`` when a call frees no page (progress is measured on the free list)."""
    needed = pool.pages_for(num_tokens)
    if needed > pool.num_pages:
        return pool.alloc(num_tokens)  # raises RequestTooLarge without evicting anything
    while needed > pool.free_pages:
        before = pool.free_pages
        evict_fn(needed - before)
        if pool.free_pages <= before:
            break
    return pool.alloc(num_tokens)


def dense_visibility(batch) -> torch.Tensor:
    """[N, N] bool, True where query row may see key column (the reference mask of a packed batch)."""
    q = batch.tin[:, None]
    return (batch.tin[None, :] <= q) & (q < batch.tout[None, :])


def assert_sampled_logprobs_match(trees: list[Tree], model, tol: float = 1e-4) -> None:
    """Every leaf's sampled-token log-probs (``Tree.token_logprobs`` along its path) equal a plain forward of the
    whole path through ``model``."""
    with torch.no_grad():
        for tree in trees:
            for leaf in tree.leaves():
                ids = torch.as_tensor(tree.path_token_ids(int(leaf)))
                logits = model(input_ids=ids[None]).logits[0].float()
                expected = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).squeeze(1)
                nodes = tree.path(int(leaf))[1:]
                got = np.concatenate([tree.token_logprobs[tree.offsets[n] : tree.offsets[n + 1]] for n in nodes])
                torch.testing.assert_close(
                    torch.as_tensor(got, dtype=torch.float32), expected[len(tree.prompt_ids) - 1 :], rtol=tol, atol=tol
                )
