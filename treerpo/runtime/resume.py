"""What a resumed run must share with the run it continues, and what it may change.

Paths are compared resolved (``out`` and ``./out`` are one folder; a moved output folder is
still the same run); options that only change evaluation, logging or checkpointing may change.
"""

from __future__ import annotations

import os
from pathlib import Path

# options that do not change what a training step computes
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "output_dir",
        "max_steps",
        "threads",
        "eval_every",
        "eval_samples",
        "eval_temperature",
        "save_every",
        "keep_checkpoints",
        "max_nonfinite_steps",
        "allow_download",
        "verify_kernels",
    }
)
PATH_OPTIONS = ("model", "dataset", "eval_dataset")


class ResumeMismatchError(ValueError):
    pass


def _resolved(value):
    if value is None or value == "synthetic" or not os.path.exists(os.path.expanduser(value)):
        return value  # a hub name or the built-in task: compared as written
    return str(Path(value).expanduser().resolve())


def comparable_config(config) -> dict:
    """The config as recorded in a checkpoint: every local path absolute."""
    values = config.to_dict()
    return {**values, **{k: _resolved(values[k]) for k in PATH_OPTIONS}}


def _defaults_of_newer_options() -> dict:
    """Options added after a checkpoint was written count as having had their default."""
    from treerpo.config import TrainConfig

    defaults = {
        name: getattr(TrainConfig, name)
        for name in ("global_weight", "fork_entropy", "min_segment_tokens", "token_weight")
    }
    lora = {"lora_rank": 0, "lora_alpha": None, "lora_targets": ["all-linear"]}  # before LoRA: every weight
    return {**defaults, **lora, "parallel": "none"}  # a checkpoint from before data parallelism was one process's


def check_resumable(current: dict, saved: dict, checkpoint: Path) -> None:
    """Refuse a resume whose options would make its steps differ from the run it continues."""
    saved = {**_defaults_of_newer_options(), **saved, **{k: _resolved(saved.get(k)) for k in PATH_OPTIONS}}
    current = {**current, **{k: _resolved(current.get(k)) for k in PATH_OPTIONS}}
    differ = {
        k: (v, saved.get(k))
        for k, v in current.items()
        if k not in RESUMABLE_CHANGES and saved.get(k) != v and not (k not in saved and v is None)
    }
    if differ:
        listed = ", ".join(f"{k}={new!r} (was {old!r})" for k, (new, old) in sorted(differ.items()))
        raise ResumeMismatchError(
            f"resume: the options differ from those {checkpoint} was trained with: {listed}; use the same values "
            f"(only {sorted(RESUMABLE_CHANGES)} may change) or another output_dir"
        )
