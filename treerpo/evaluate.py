"""``python -m treerpo.evaluate``: pass@1 of a model on benchmark files (every format of ../shared/data).

    python -m treerpo.evaluate --model PATH --data ../shared/data/math500_test.jsonl ../shared/data/gsm8k_test.jsonl
    python -m treerpo.evaluate --data synthetic          # the embedded model on the held-out chain problems

Greedy by default; ``--samples N --temperature T`` gives the mean accuracy over N samples.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .evaluation import pass_at_1


def benchmark(name: str, tokenizer, limit: int | None):
    """(prompts, golds, reward kind) of a benchmark file, or of the synthetic held-out set."""
    if name == "synthetic":
        from .data.tasks import synthetic_task

        task = synthetic_task(limit or 256)
        return [p for p, _ in task.eval], [g for _, g in task.eval], "chain"
    from .data.math_datasets import format_math_prompt, load_problems

    problems = load_problems(name)[:limit]
    return [format_math_prompt(p.question, tokenizer) for p in problems], [p.answer for p in problems], "math"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treerpo.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local model folder or hub name (default: the embedded model)")
    parser.add_argument("--data", nargs="+", required=True, help="benchmark files (.jsonl/.json) or 'synthetic'")
    parser.add_argument("--samples", type=int, default=1, help="samples per problem (n)")
    parser.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for n=1, else 1.0")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 40 synthetic, 1024 math")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--deadline", type=float, default=5.0, help="seconds the verifier may spend on one answer")
    parser.add_argument("--output", type=Path, default=Path("eval_results.json"))
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 1.0)

    from .data.tasks import make_reward
    from .models.tiny import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    rewards = {}
    results = {"model": args.model or "embedded", "samples": args.samples, "temperature": temperature,
               "benchmarks": {}}
    try:
        for name in args.data:
            prompts, golds, kind = benchmark(name, tokenizer, args.limit)
            if kind not in rewards:
                rewards[kind] = make_reward(kind, args.deadline)
            max_new = args.max_new_tokens or (40 if kind == "chain" else 1024)
            start = time.perf_counter()
            res = pass_at_1(model, tokenizer, prompts, golds, rewards[kind], max_new, n=args.samples,
                            temperature=temperature, top_p=args.top_p, batch_size=args.batch_size)
            label = "synthetic" if name == "synthetic" else Path(name).stem
            results["benchmarks"][label] = {"pass@1": res.accuracy, f"pass@{args.samples}": res.pass_at_n,
                                            "problems": len(prompts), "mean_response_tokens": res.mean_response_tokens,
                                            "seconds": time.perf_counter() - start}
            print(f"{label:>28}: pass@1 {res.accuracy:.4f}  ({len(prompts)} problems, n={args.samples})")
    finally:
        for reward in rewards.values():
            getattr(reward, "close", lambda: None)()
    args.output.write_text(json.dumps(results, indent=1))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
