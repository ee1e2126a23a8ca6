"""Atomic checkpoints in Hugging Face format, plus the optimizer and trainer state to resume exactly.

A checkpoint is written into a temporary folder and renamed into place, then the
``latest`` pointer is replaced atomically: a crash at any moment leaves the previous
checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: Path, step: int, model, tokenizer, optimizer, state: dict, keep: int = 2, extra: dict | None = None
) -> Path:
    """``extra``: more tensors to keep, {file name: object for torch.save} (e.g. fp32 master weights)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / name)
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
    write_text_atomic(output_dir / LATEST, final.name)
    prune_checkpoints(output_dir, keep, step)
    return final


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in Path(output_dir).glob("checkpoint-*") if p.name[11:].isdigit())


def prune_checkpoints(output_dir: Path, keep: int, newest: int) -> None:
    """Keep ``newest`` (the one just written) and the most recent others, ``keep`` in all."""
    others = [s for s in checkpoint_steps(output_dir) if s != newest]
    for step in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(Path(output_dir) / f"checkpoint-{step}", ignore_errors=True)


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = Path(output_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(output_dir) / pointer.read_text().strip()
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(
            f"{pointer} names {path.name}, which is incomplete or missing; "
            "point it at an existing checkpoint folder or remove it to start afresh"
        )
    return path


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())
