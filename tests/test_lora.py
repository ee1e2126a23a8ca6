"""LoRA (PEFT) on the policy: the packed forward, the engine and the trainer run the adapted model (applied, not
merged); the reference is the base with the adapter disabled; checkpoints hold the adapter, which loads."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from safetensors.torch import load_file

from helpers import assert_close_normwise, assert_sampled_logprobs_match, random_tree
from treerpo.attention import enable_tree_attention
from treerpo.config import make_config
from treerpo.engine import TreeSampler
from treerpo.models.tiny import load_model_and_tokenizer
from treerpo.policy.adapters import adapter_disabled, add_lora, base_of
from treerpo.policy.logprobs import packed_logprobs
from treerpo.sampling.reference_sampler import ReferenceTreeSampler
from treerpo.training.trainer import Trainer
from treerpo.tree import TreeSpec
from treerpo.trees.packing import pack_trees

VOCAB = 20  # below the tiny tokenizer's 24


def adapted_tiny(seed: int = 0):
    """The tiny model with a rank-4 adapter whose B is random (PEFT starts it at zero: the identity)."""
    model, tokenizer = load_model_and_tokenizer(None)
    untouched = copy.deepcopy(model)
    peft_model = add_lora(enable_tree_attention(model), rank=4, alpha=8, targets=["all-linear"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return peft_model, untouched, tokenizer


def batch_of_trees(seed: int = 0):
    rng = np.random.default_rng(seed)
    trees = [random_tree(rng, 6, vocab=VOCAB, prompt_len=3), random_tree(rng, 4, vocab=VOCAB, shape="chain")]
    batch = pack_trees(trees)
    return trees, batch, torch.nonzero(batch.loss_mask).squeeze(1)


def per_path_logprobs(model, trees, batch, rows):
    """Each row's log-prob from a plain forward of its root-to-node path through ``model`` (the PeftModel)."""
    out = []
    for r in rows.tolist():
        ids = torch.as_tensor(trees[int(batch.tree_index[r])].path_token_ids(int(batch.node_index[r])))
        logits = model(input_ids=ids[None]).logits[0].float()
        position = int(batch.position_ids[r])
        out.append(torch.log_softmax(logits[position - 1], -1)[ids[position]])
    return torch.stack(out)


def test_lora_gradients_equal_a_per_path_loss_through_the_peft_model():
    peft_model, _, _ = adapted_tiny()
    reference = copy.deepcopy(peft_model)
    trees, batch, rows = batch_of_trees()
    weights = torch.as_tensor(np.random.default_rng(1).normal(size=len(rows)), dtype=torch.float32)
    (packed_logprobs(base_of(peft_model), batch, rows) * weights).sum().backward()
    (per_path_logprobs(reference, trees, batch, rows) * weights).sum().backward()
    lora = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora), "only the adapter trains"
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            assert_close_normwise(p.grad, lora[name].grad, rel=1e-5, floor=1e-8, msg=name)
        else:
            assert p.grad is None, name


def test_reference_is_the_base_with_the_adapter_disabled():
    peft_model, untouched, _ = adapted_tiny()
    trees, batch, rows = batch_of_trees()
    with torch.no_grad():
        adapted = packed_logprobs(base_of(peft_model), batch, rows)
        with adapter_disabled(peft_model):
            disabled = packed_logprobs(base_of(peft_model), batch, rows)
        base = packed_logprobs(enable_tree_attention(untouched), batch, rows)
    torch.testing.assert_close(disabled, base, rtol=1e-6, atol=1e-6)
    assert float((adapted - base).abs().max()) > 1e-3, "the adapter must change the policy for this to mean anything"


class IdTokenizer:
    pad_token_id, eos_token_id, padding_side, bos_token = 0, 1, "left", None

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))


def test_engine_samples_the_adapted_model():
    """Greedy trees and sampled-token log-probs of the engine on the adapted model equal those of the adapter
    merged into a plain copy (PEFT's merge_and_unload), an independent computation of the same policy."""
    peft_model, _, _ = adapted_tiny()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    prompts = [[5, 9, 14, 3], [7, 7, 12]]
    sampler = TreeSampler(base_of(peft_model), IdTokenizer(), pool_tokens=1024, ignore_eos=True)
    greedy = sampler.sample(prompts, TreeSpec((2, 2), segment_tokens=4, temperature=0.0))
    reference = ReferenceTreeSampler(merged, IdTokenizer()).sample(prompts, TreeSpec((2, 2), 4, temperature=0.0))
    assert [t.token_ids.tolist() for t in greedy] == [t.token_ids.tolist() for t in reference]
    sampled = sampler.sample(prompts, TreeSpec((2, 2), segment_tokens=4, temperature=1.0), seeds=[0, 1])
    assert_sampled_logprobs_match(sampled, merged)


def lora_trainer(out, **options) -> Trainer:
    config = {
        "lora_rank": 4,
        "prompts_per_step": 4,
        "eval_size": 4,
        "eval_every": 0,
        "save_every": 1,
        "lr": 1e-3,
        "threads": 1,
        "output_dir": str(out),
        **options,
    }
    return Trainer(make_config(config), log=lambda *a: None)


@pytest.mark.slow
def test_trainer_trains_the_adapter_saves_it_and_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with lora_trainer(straight, max_steps=2) as trainer:
        base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
        trainer.train()
        assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if not p.requires_grad)
        assert trainer.reference is None, "the reference is the base with the adapter disabled, not a copy"
        with torch.no_grad():
            ids = torch.tensor([[5, 9, 14, 3, 7]])
            adapted_logits = trainer.model(input_ids=ids).logits
    with lora_trainer(resumed, max_steps=1) as trainer:
        trainer.train()
    with lora_trainer(resumed, max_steps=2, resume=True) as trainer:
        trainer.train()
    checkpoint = straight / "checkpoint-2"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 4
    assert not (checkpoint / "model.safetensors").exists(), "a LoRA checkpoint holds the adapter, not the model"
    a, b = (
        load_file(checkpoint / "adapter_model.safetensors"),
        load_file(resumed / "checkpoint-2" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(straight / "checkpoint-1" / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a), "the adapter must train"
    merged, _ = load_model_and_tokenizer(checkpoint)  # what evaluate loads: the base with the adapter merged
    with torch.no_grad():
        assert_close_normwise(merged(input_ids=ids).logits, adapted_logits, rel=1e-5, floor=1e-6)


def test_lora_with_data_parallelism_is_refused_before_any_work(monkeypatch):
    from treerpo.config import ConfigError

    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="--lora-rank with --parallel ddp"):
        make_config({"lora_rank": 8}).validate_launch()
