"""``python -m treerpo.train``: TreeRPO (or GRPO) on the embedded default or your model and data.

Exit codes: 0 done; 1 stopped by non-finite training; 2 refused input (nothing was trained);
128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM) after writing a checkpoint.
"""

from __future__ import annotations

import os
import shlex
import sys

from treerpo.config import ConfigError, parse_args


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that name the bad input and its fix: printed without a traceback."""
    from treerpo.attention.hf_integration import UnsupportedModelError
    from treerpo.data.math_datasets import DatasetFormatError
    from treerpo.engine.kv_pool import RequestTooLarge
    from treerpo.models.source import ModelSourceError
    from treerpo.runtime.resume import ResumeMismatchError
    from treerpo.runtime.run_lock import OutputDirLockedError
    from treerpo.sampling.prompt_rules import PromptTooLongError, UnrepresentablePromptError
    from treerpo.training.metrics import MetricsLogError

    return (
        ConfigError,
        DatasetFormatError,
        RequestTooLarge,
        MetricsLogError,
        ModelSourceError,
        UnrepresentablePromptError,
        PromptTooLongError,
        ResumeMismatchError,
        OutputDirLockedError,
        UnsupportedModelError,
        FileNotFoundError,
    )


def resume_command(argv: list[str]) -> str:
    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")  # its value, e.g. "--resume false"
            continue
        if not a.startswith("--resume="):
            args.append(a)
    return shlex.join([*launcher(), "-m", "treerpo.train", *args, "--resume"])


def is_main_process() -> bool:
    """One process, or rank 0 of a torchrun launch (which reports for all ranks)."""
    return os.environ.get("RANK", "0") == "0"


def launcher() -> list[str]:
    """How this process was started: plain python, or torchrun with its node and process counts."""
    if "LOCAL_WORLD_SIZE" not in os.environ or "WORLD_SIZE" not in os.environ:
        return ["python"]
    per_node, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    return ["torchrun", f"--nnodes={world // per_node}", f"--nproc_per_node={per_node}"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config = parse_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from treerpo.runtime.finite_guard import NonFiniteError
    from treerpo.runtime.graceful_stop import TrainingInterrupted
    from treerpo.training.trainer import Trainer

    try:
        trainer = Trainer(config)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted while setting up: nothing was trained or written", file=sys.stderr)
        return 130
    try:
        summary = trainer.train()
    except TrainingInterrupted as stopped:
        if is_main_process():
            print(f"{stopped}\nresume with:\n  {resume_command(argv)}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt as err:
        print(
            f"\nstopped at once ({err or 'interrupted'}); resume from the latest checkpoint with:\n  "
            f"{resume_command(argv)}",
            file=sys.stderr,
        )
        return 130
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    if not is_main_process():
        return 0
    print(
        f"{summary['algo']}: held-out accuracy {summary['initial_eval_accuracy']:.3f} -> "
        f"{summary['final_eval_accuracy']:.3f} in {summary['steps']} steps, {summary['wall_time_s']:.0f} s; "
        f"outputs in {config.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
