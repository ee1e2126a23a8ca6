"""benchmarks/decode_bound.py: its lean decoder computes the model's own logits, or refuses the model."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from helpers import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from decode_bound import LeanDecoder


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # Qwen2: q/k/v biases and tied embeddings; Llama: neither
def test_lean_decoder_steps_give_the_models_logits(arch):
    model = tiny_model(arch, tree_attention=False)
    for layer in model.model.layers:  # non-trivial norms and biases, so that a dropped term shows
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data.uniform_(0.5, 1.5)
        if layer.self_attn.q_proj.bias is not None:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    ids = torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    lean = LeanDecoder(model, rows=3, max_len=9)
    for position in range(9):
        torch.testing.assert_close(lean.step(ids[:, position], position), expected[:, position], rtol=1e-4, atol=1e-4)


def test_other_families_are_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30))
    with pytest.raises(ValueError, match="Llama- or Qwen2-style"):
        LeanDecoder(model, rows=1, max_len=4)
