"""``python -m treerpo.evaluate``: pass@1 of a model on benchmark files (every format of ../shared/data).

    python -m treerpo.evaluate --model PATH --data ../shared/data/math500_test.jsonl ../shared/data/gsm8k_test.jsonl
    python -m treerpo.evaluate --data synthetic --output eval.json   # the embedded model, held-out chain problems

Greedy by default; ``--samples N --temperature T`` gives the mean accuracy over N samples.
Results go to ``--output``, by default ``eval_results.json`` in the model's folder; the embedded
model and hub models need an explicit ``--output``. A prompt the model's tokenizer cannot
represent, or one that with ``--max-new-tokens`` overruns the model's context, is refused
before anything is scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from treerpo.sampling.evaluation import pass_at_1
from treerpo.sampling.generation import encode_prompts


def benchmark(name: str, tokenizer, limit: int | None):
    """(prompts, golds, reward kind) of a benchmark file, or of the synthetic held-out set."""
    if name == "synthetic":
        from treerpo.data.tasks import synthetic_task

        task = synthetic_task(limit or 256)
        return [p for p, _ in task.eval], [g for _, g in task.eval], "chain"
    from treerpo.data.math_datasets import format_math_prompt, load_problems

    problems = load_problems(name)[:limit]
    return [format_math_prompt(p.question, tokenizer) for p in problems], [p.answer for p in problems], "math"


def default_output(model: str | None) -> Path | None:
    """eval_results.json beside a local model's weights; None for the embedded model or a hub name."""
    if model is not None and Path(model).expanduser().is_dir():
        return Path(model).expanduser() / "eval_results.json"
    return None


def max_new_tokens(args, kind: str) -> int:
    return args.max_new_tokens or (40 if kind == "chain" else 1024)


def check_context(model, encoded: list[list[int]], max_new: int, name: str) -> None:
    """Every prompt plus ``max_new`` answer tokens within the model's positions (else the score means nothing)."""
    from treerpo.sampling.prompt_rules import PromptTooLongError, max_positions_of

    limit = max_positions_of(model)
    longest = max((len(ids) for ids in encoded), default=0)
    if limit is not None and longest + max_new > limit:
        raise PromptTooLongError(
            f"{name}: a prompt of {longest} tokens plus --max-new-tokens {max_new} overruns the "
            f"model's context of {limit} positions; lower --max-new-tokens (at most "
            f"{max(limit - longest, 0)} here) or use a model with a longer context"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m treerpo.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="local model folder or hub name (default: the embedded model)")
    parser.add_argument(
        "--allow-download",
        action="store_true",
        help="fetch a hub model that is not in the local cache (off: no network traffic)",
    )
    parser.add_argument("--data", nargs="+", required=True, help="benchmark files (.jsonl/.json) or 'synthetic'")
    parser.add_argument("--samples", type=int, default=1, help="samples per problem (n)")
    parser.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for n=1, else 1.0")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 40 synthetic, 1024 math")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--deadline", type=float, default=5.0, help="seconds the verifier may spend on one answer")
    parser.add_argument(
        "--output", type=Path, default=None, help="results file (default: eval_results.json in the model's folder)"
    )
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    output = args.output or default_output(args.model)
    if output is None:
        parser.error(
            "--output is required for the embedded model or a hub model (results are never written into "
            "the current folder unasked); e.g. --output results/eval.json"
        )
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 1.0)

    from treerpo.data.math_datasets import DatasetFormatError
    from treerpo.data.tasks import make_reward
    from treerpo.models.source import ModelSourceError
    from treerpo.models.tiny import load_model_and_tokenizer
    from treerpo.sampling.prompt_rules import PromptTooLongError, UnrepresentablePromptError, check_representable

    try:
        model, tokenizer = load_model_and_tokenizer(args.model, allow_download=args.allow_download)
        loaded = [(name, *benchmark(name, tokenizer, args.limit)) for name in args.data]
        for name, prompts, _, kind in loaded:
            encoded = encode_prompts(tokenizer, prompts)
            check_representable(tokenizer, prompts, encoded, name)
            check_context(model, encoded, max_new_tokens(args, kind), name)
    except (
        ModelSourceError,
        FileNotFoundError,
        DatasetFormatError,
        UnrepresentablePromptError,
        PromptTooLongError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rewards = {}
    results = {"model": args.model or "embedded", "samples": args.samples, "temperature": temperature, "benchmarks": {}}
    try:
        for name, prompts, golds, kind in loaded:
            if kind not in rewards:
                rewards[kind] = make_reward(kind, args.deadline)
            max_new = max_new_tokens(args, kind)
            start = time.perf_counter()
            res = pass_at_1(
                model,
                tokenizer,
                prompts,
                golds,
                rewards[kind],
                max_new,
                n=args.samples,
                temperature=temperature,
                top_p=args.top_p,
                batch_size=args.batch_size,
            )
            label = "synthetic" if name == "synthetic" else Path(name).stem
            results["benchmarks"][label] = {
                "pass@1": res.accuracy,
                f"pass@{args.samples}": res.pass_at_n,
                "problems": len(prompts),
                "mean_response_tokens": res.mean_response_tokens,
                "seconds": time.perf_counter() - start,
            }
            print(f"{label:>28}: pass@1 {res.accuracy:.4f}  ({len(prompts)} problems, n={args.samples})")
    finally:
        for reward in rewards.values():
            getattr(reward, "close", lambda: None)()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
