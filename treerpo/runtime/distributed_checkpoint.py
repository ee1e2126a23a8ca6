"""Checkpoints of a DDP or FSDP2 run, written atomically like a one-process checkpoint.

``checkpoint-N/`` holds the resumable state in torch.distributed.checkpoint (DCP) format (``dcp/``: model and
optimizer, each rank writing its shards, reshardable to another world size), the Hugging Face export (the full
weights gathered to rank 0, loadable with ``from_pretrained``), ``trainer_state.json`` and every rank's RNG state.
All ranks write into a temporary folder; rank 0 renames it into place and then replaces ``latest``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from treerpo.runtime.checkpoint import LATEST, _fsync_dir, prune_checkpoints, write_text_atomic
from treerpo.runtime.distributed import World

DCP_FOLDER = "dcp"
POLICY_PREFIX = "model."  # PolicyLogprobs keeps the Hugging Face model as ``.model``


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank}.pt"


def save_distributed_checkpoint(
    world: World,
    output_dir: Path,
    step: int,
    policy,
    optimizer,
    hf_model,
    tokenizer,
    state: dict,
    keep: int = 2,
    export_dtype: torch.dtype = torch.float32,
) -> Path:
    """Collective: every rank calls it. ``policy`` is the DDP- or FSDP2-wrapped ``PolicyLogprobs``; the Hugging Face
    export is in ``export_dtype`` (the compute dtype: a half-precision run's fp32 masters rounded, as one process
    rounds them into its model)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    model_state, optimizer_state = get_state_dict(policy, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / DCP_FOLDER)
    torch.save(rng_state(), tmp / rng_file(world.rank))
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        export_hf(hf_model, tokenizer, full, tmp, export_dtype)
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    world.barrier()
    if world.is_main:
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        write_text_atomic(output_dir / LATEST, final.name)
        prune_checkpoints(output_dir, keep, step)
    world.barrier()
    return final


def export_hf(hf_model, tokenizer, policy_state: dict, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """The gathered full weights in Hugging Face format (safetensors, config, tokenizer), floats in ``dtype``."""
    weights = {
        name.removeprefix(POLICY_PREFIX): tensor.to(dtype) if tensor.is_floating_point() else tensor
        for name, tensor in policy_state.items()
    }
    for name in tied_output_names(hf_model):  # saved once, as the input embedding (what save_pretrained does)
        weights.pop(name, None)
    hf_model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
    _set_config_dtype(folder / "config.json", dtype)  # save_pretrained wrote the fp32 masters' dtype
    tokenizer.save_pretrained(folder)


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    config = json.loads(config_file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def tied_output_names(hf_model) -> list[str]:
    config = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    output = hf_model.get_output_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or output is None:
        return []
    return [f"{name}.weight" for name, module in hf_model.named_modules() if module is output]


def load_distributed_state(checkpoint: Path, policy, optimizer, world: World) -> None:
    """Model and optimizer from ``checkpoint/dcp`` (resharded to this world size); this rank's RNG state when the
    checkpoint has one for it."""
    model_state, optimizer_state = get_state_dict(policy, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=Path(checkpoint) / DCP_FOLDER)
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    saved_rng = Path(checkpoint) / rng_file(world.rank)
    if saved_rng.exists():
        set_rng_state(torch.load(saved_rng, weights_only=False))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(folder)
