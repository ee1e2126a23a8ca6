"""How fast plain sampling could be on this machine: a decode step with nothing but the model's own work.

    python benchmarks/decode_bound.py --model tiny --prompts 32 --leaves 16 --new-tokens 36 --json bound.json

Compared, on the same prompts, rows (prompts x leaves) and tokens (EOS ignored):
  bound        the model's decoder layers run as lean as eager PyTorch allows for one-token steps: q/k/v and
               gate/up each one matmul (weights concatenated once), fused RMSNorm, RoPE from one table lookup a
               step, every row's K/V in one dense preallocated buffer read in place (no paging, no gather, no
               cache concatenation), the engine's own draw; decode steps only (the prompt's K/V are zeros of
               its length, its prefill is not timed): a lower bound, not a sampler
  engine_flat  treerpo's engine on depth-1 trees (rollout.py's engine_flat)
  hf_generate  Hugging Face generate, num_return_sequences = leaves (rollout.py's hf_generate)
``generate_over_bound`` is the most any eager-PyTorch engine could gain over ``generate`` here. Llama- and
Qwen2-style decoders only (the projections by those names, default RoPE); others are refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, timed, write_json
from rollout import PROMPTS, load, run_engine, run_generate

from treerpo.engine.sampling import SamplingParams, draw
from treerpo.policy.lm_head import LMHead
from treerpo.policy.logprobs import decoder_of
from treerpo.tree import TreeSpec


class LeanDecoder:
    """The model's weights rearranged for one-token decode steps of ``rows`` rows up to ``max_len`` positions."""

    def __init__(self, model, rows: int, max_len: int):
        config = model.config
        rope_type = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
        if rope_type != "default" or getattr(config, "use_sliding_window", False):
            raise ValueError(
                f"decode_bound: {config.model_type} with rope scaling or a sliding window is not "
                "covered; use a Llama- or Qwen2-style model with default RoPE"
            )
        decoder = decoder_of(model)
        try:
            self.layers = [self._layer(layer) for layer in decoder.layers]
        except AttributeError as err:
            raise ValueError(
                f"decode_bound: {config.model_type} does not have Llama/Qwen2 projections ({err}); "
                "use a Llama- or Qwen2-style model"
            ) from None
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.embed, self.norm, self.head = decoder.embed_tokens.weight, decoder.norm, LMHead(model)
        self.inv_freq = decoder.rotary_emb.inv_freq.float()
        shape = (len(self.layers), rows, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.embed.dtype, device=self.embed.device)
        self.values = torch.zeros_like(self.keys)

    @staticmethod
    def _layer(layer) -> dict:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        bias = torch.cat([p.bias for p in projections]) if attn.q_proj.bias is not None else None
        return {
            "qkv": torch.cat([p.weight for p in projections]),
            "qkv_bias": bias,
            "o": attn.o_proj.weight,
            "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            "down": mlp.down_proj.weight,
            "norm1": layer.input_layernorm,
            "norm2": layer.post_attention_layernorm,
        }

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Feed ``tokens`` [rows] at ``position`` (every row at the same one) -> logits [rows, vocab]."""
        rows, hq, hkv, d = len(tokens), self.heads, self.kv_heads, self.head_dim
        angles = position * self.inv_freq
        cos, sin = (
            torch.cat([angles.cos()] * 2).to(self.embed.dtype),
            torch.cat([angles.sin()] * 2).to(self.embed.dtype),
        )
        x = self.embed[tokens]
        for i, w in enumerate(self.layers):
            h = F.rms_norm(x, x.shape[-1:], w["norm1"].weight, w["norm1"].variance_epsilon)
            qkv = F.linear(h, w["qkv"], w["qkv_bias"]).view(rows, hq + 2 * hkv, d)
            qk = qkv[:, : hq + hkv]
            first, second = qk[..., : d // 2], qk[..., d // 2 :]
            qk = qk * cos + torch.cat([-second, first], -1) * sin
            self.keys[i, :, :, position] = qk[:, hq:]
            self.values[i, :, :, position] = qkv[:, hq + hkv :]
            keys, values = self.keys[i, :, :, : position + 1], self.values[i, :, :, : position + 1]
            q = qk[:, :hq].reshape(rows, hkv, hq // hkv, d)
            weights = torch.softmax(q @ keys.transpose(-1, -2) * d**-0.5, -1)
            x = x + F.linear((weights @ values).reshape(rows, hq * d), w["o"])
            h = F.rms_norm(x, x.shape[-1:], w["norm2"].weight, w["norm2"].variance_epsilon)
            gate, up = F.linear(h, w["gate_up"]).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, w["down"])
        return self.head.logits(self.norm(x))


def run_bound(model, prompts: list, leaves: int, new_tokens: int) -> dict:
    """Decode steps of ``len(prompts) x leaves`` rows from the longest prompt's length on, sampled with the
    engine's draw; the prompt's K/V are zeros (its prefill is not timed)."""
    rows, start = len(prompts) * leaves, max(map(len, prompts))
    lean = LeanDecoder(model, rows, start + new_tokens)
    first = torch.tensor([p[-1] for p in prompts for _ in range(leaves)], device=lean.embed.device)
    params = SamplingParams(temperature=1.0)

    def decode():
        tokens = first
        for position in range(start, start + new_tokens):
            logits = lean.step(tokens, position)
            u = torch.rand(rows, 1, dtype=torch.float64, device=logits.device)
            tokens = draw(logits, params, u)[0][:, 0]
        return tokens.cpu()

    _, seconds = timed(decode)
    return {"rows": rows, "generated_tokens": rows * new_tokens, "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, smollm2, or a local Llama/Qwen2-style model folder")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--leaves", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per system (the fastest is kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load(args.model)
    texts = (
        [f"{i + 1}+{i + 2}-3=" for i in range(args.prompts)]
        if args.model == "tiny"
        else (PROMPTS * args.prompts)[: args.prompts]
    )
    prompts = [tok(t)["input_ids"] for t in texts]
    flat = TreeSpec((args.leaves,), args.new_tokens, max_prompt_tokens=256)
    print(
        f"plain sampling bound on {machine()}; model {args.model} ({model.dtype}); {args.prompts} prompts x "
        f"{args.leaves} answers x {args.new_tokens} tokens (EOS ignored); best of {args.repeats}"
    )
    print("compared: bound (the model's own work in lean eager PyTorch, decode steps only), engine_flat, hf_generate")

    def best(fn):
        return min((fn() for _ in range(args.repeats)), key=lambda r: r["seconds"])

    systems = {
        "bound": best(lambda: run_bound(model, prompts, args.leaves, args.new_tokens)),
        "engine_flat": best(lambda: run_engine(model, tok, prompts, flat, True, 1 << 15)),
        "hf_generate": best(lambda: run_generate(model, tok, prompts, args.leaves, args.new_tokens)),
    }
    print_table(
        [{"system": k, "seconds": v["seconds"], "generated_tokens": v["generated_tokens"]} for k, v in systems.items()],
        ["system", "seconds", "generated_tokens"],
    )
    seconds = {k: v["seconds"] for k, v in systems.items()}
    ratios = {
        "generate_over_bound": seconds["hf_generate"] / seconds["bound"],
        "generate_over_engine_flat": seconds["hf_generate"] / seconds["engine_flat"],
        "engine_flat_over_bound": seconds["engine_flat"] / seconds["bound"],
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.3g}")
    write_json(
        args.json,
        {
            "machine": machine(),
            "model": args.model,
            "prompts": args.prompts,
            "leaves": args.leaves,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "systems": systems,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
