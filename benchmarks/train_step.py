"""A training step in fp32 against bf16 with fp32 master weights, side by side in one run.

    python benchmarks/train_step.py --model smollm2 --trees 4 --json train_step.json

With ``--compile``, a third system: the bf16 step with every decoder layer ``torch.compile``d (forward and backward
through AOTAutograd; the tree attention runs eagerly between the graphs), its first step (which compiles) timed
apart.

One step, as the trainer runs it: the packed tree-masked forward of a batch of trees, each loss token's log-prob
through the LM head (``policy.logprobs.packed_logprobs``), the policy-gradient loss, the backward, and the
optimizer (AdamW): on the fp32 model directly; on the bf16 model over fp32 master weights
(``policy.precision.MasterWeights``: gradients to the masters, the step, the masters rounded back). The trees are
random tokens of the model's vocabulary shaped like a rollout's (``--branching`` x ``--segment-tokens`` after a
``--prompt-tokens`` prompt), every generated token a loss token. The two dtypes' steps alternate (``--repeats``
each, after one warm-up), the fastest of each kept. Also reported: the loss tokens' log-probs in bf16 against fp32
on the same batch (norm-relative difference), before any step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, write_json
from rollout import load

from treerpo.attention import enable_tree_attention
from treerpo.memory.workload import full_tree
from treerpo.policy.logprobs import packed_logprobs
from treerpo.policy.precision import MasterWeights
from treerpo.tree import TreeSpec
from treerpo.trees.packing import pack_trees


def random_trees(count: int, vocab: int, prompt_tokens: int, branching, segment_tokens: int, seed: int = 0):
    """``count`` full trees of random tokens (every node expanded, every group kept), as the memory plan builds."""
    spec = TreeSpec(tuple(branching), segment_tokens, max_prompt_tokens=prompt_tokens)
    rng = np.random.default_rng(seed)
    return [full_tree(spec, prompt_tokens, rng, vocab) for _ in range(count)]


class Step:
    """One dtype's model, optimizer (over fp32 masters for a half model) and step."""

    def __init__(self, model, lr: float = 1e-6):
        self.model = enable_tree_attention(model).train()
        self.masters = None if model.dtype == torch.float32 else MasterWeights(model)
        params = self.masters.params if self.masters else [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, foreach=True)

    def __call__(self, batch) -> float:
        start = time.perf_counter()
        logprobs = packed_logprobs(self.model, batch)
        loss = -(logprobs * batch.advantages[batch.loss_mask]).mean()
        loss.backward()
        if self.masters:
            self.masters.grads_to_master()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters:
            self.masters.master_to_model()
        if batch.input_ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a local model folder")
    parser.add_argument("--trees", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--branching", type=int, nargs="+", default=[2, 2, 2])
    parser.add_argument("--segment-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per dtype (the fastest kept)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time bf16 steps with every decoder layer torch.compile'd (the tree attention eager between graphs)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"fp32": load(args.model, torch.float32)[0], "bf16": load(args.model, torch.bfloat16)[0]}
    vocab = models["fp32"].config.vocab_size
    trees = random_trees(args.trees, vocab, args.prompt_tokens, args.branching, args.segment_tokens)
    batch = pack_trees(trees)
    loss_tokens = int(batch.loss_mask.sum())
    print(
        f"training step benchmark on {machine()}; model {args.model}; {args.trees} trees {args.branching} x "
        f"{args.segment_tokens} tokens after a {args.prompt_tokens}-token prompt: {batch.num_tokens} packed tokens, "
        f"{loss_tokens} loss tokens"
    )
    print("compared: fp32 (model and AdamW in fp32) against bf16 (bf16 model, AdamW over fp32 master weights)")
    with torch.no_grad():
        lp = {name: packed_logprobs(enable_tree_attention(m), batch).double() for name, m in models.items()}
    logprob_error = float((lp["bf16"] - lp["fp32"]).norm() / lp["fp32"].norm())
    steps = {name: Step(m) for name, m in models.items()}
    if args.compile:
        from treerpo.engine.compiled_layers import compile_seconds
        from treerpo.policy.logprobs import decoder_of

        compiled_model = load(args.model, torch.bfloat16)[0]
        for layer in decoder_of(compiled_model).layers:
            layer.compile(dynamic=True)
        steps["bf16_compiled"] = Step(compiled_model)
    seconds = {name: [] for name in steps}
    warm = {}
    for name, step in steps.items():
        warm[name] = step(batch)  # warm-up (the compiled layers compile here)
    for _ in range(args.repeats):
        for name, step in steps.items():
            seconds[name].append(step(batch))
    rows = [
        {"system": name, "seconds": min(s), "tokens_per_s": batch.num_tokens / min(s), "runs": len(s)}
        for name, s in seconds.items()
    ]
    print_table(rows, ["system", "seconds", "tokens_per_s", "runs"])
    ratios = {
        "bf16_speedup_vs_fp32": min(seconds["fp32"]) / min(seconds["bf16"]),
        "bf16_logprob_relative_difference": logprob_error,
    }
    if args.compile:
        ratios["bf16_compiled_speedup_vs_bf16"] = min(seconds["bf16"]) / min(seconds["bf16_compiled"])
        ratios["compile_seconds"] = compile_seconds()
        print(f"compiled layers: first step {warm['bf16_compiled']:.1f} s, {compile_seconds():.1f} s compiling")
    for k, v in ratios.items():
        print(f"{k}: {v:.3g}")
    write_json(
        args.json,
        {
            "machine": machine(),
            "model": args.model,
            "threads": torch.get_num_threads(),
            "packed_tokens": batch.num_tokens,
            "loss_tokens": loss_tokens,
            "seconds": seconds,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
