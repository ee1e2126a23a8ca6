"""Make the embedded default checkpoint: a short supervised warm-up of the tiny model on the chain task.

    python -m treerpo.models.warmup [--steps 1300] [--output treerpo/models/tiny_chain]

The step count is fixed (not a time budget) so the checkpoint is the same on every machine
of the same software. The warm-up stops where greedy accuracy is partial and sampled
answers disagree, which is the regime where reinforcement learning has a signal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from treerpo.data.synthetic import ChainTask, chain_reward
from treerpo.models.tiny import DEFAULT_MODEL_DIR, build_char_tokenizer, build_tiny_model
from treerpo.sampling.evaluation import pass_at_1


def supervised_batch(tokenizer, problems, device="cpu"):
    """Right-padded prompt+solution+EOS rows; labels only on the solution."""
    rows, labels = [], []
    for prompt, _, solution in problems:
        p = tokenizer(prompt)["input_ids"]
        s = tokenizer(solution)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + s)
        labels.append([-100] * len(p) + s)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)], lab[i, : len(l)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(l), 1
    return ids.to(device), mask.to(device), lab.to(device)


def warm_up(
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    eval_every: int = 0,
    eval_problems=None,
    log=print,
):
    torch.manual_seed(seed)
    task = ChainTask()
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed + 1)
    exclude = {p[0] for p in eval_problems or ()}
    for step in range(1, steps + 1):
        problems = [p for p in (task.sample(rng) for _ in range(batch_size)) if p[0] not in exclude]
        ids, mask, labels = supervised_batch(tokenizer, problems)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if eval_every and eval_problems and step % eval_every == 0:
            report(model, tokenizer, eval_problems, step, loss.item(), log)
    return model, tokenizer


def report(model, tokenizer, problems, step, loss, log):
    prompts, golds = [p[0] for p in problems], [p[1] for p in problems]
    greedy = pass_at_1(model, tokenizer, prompts, golds, chain_reward, max_new_tokens=40)
    sampled = pass_at_1(model, tokenizer, prompts, golds, chain_reward, max_new_tokens=40, temperature=1.0, n=4)
    log(
        f"step {step}: loss {loss:.3f} greedy {greedy.accuracy:.3f} sampled {sampled.accuracy:.3f} "
        f"pass@4 {sampled.pass_at_n:.3f}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--output", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    held_out = ChainTask().problems(256, seed=12345)
    model, tokenizer = warm_up(args.steps, seed=args.seed, eval_every=args.eval_every, eval_problems=held_out)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    tokenizer.save_pretrained(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
