"""Autotuning of the Triton tree attention's tile configurations (``TREERPO_TRITON_AUTOTUNE=1``, a GPU).

Triton's own autotuner cannot tune these kernels: each tile shape needs its own skip list, which only the
caller can compute. Here each kernel's candidates (``tile_configs.candidates``) are timed on the batch at
hand, one kernel at a time (the forward alone, then dK/dV and dQ through a forward and backward with the
others fixed); a configuration that fails to compile or launch is skipped. Configurations forced by
``TREERPO_TRITON_TILES``/``set_tile_override`` are not tuned. Every candidate computes the same attention,
so the choice changes speed only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from treerpo.kernels.tile_configs import KERNELS, TreeTiles, candidates, hopper_class, overrides

logger = logging.getLogger(__name__)
REPEATS = 3


def autotune_tree_tiles(run, query: torch.Tensor, key: torch.Tensor, base: TreeTiles) -> TreeTiles:
    """The fastest configuration, kernel by kernel, starting from ``base``. ``run(tiles, backward)`` runs the
    attention of the batch with ``tiles`` (and its backward when asked)."""
    d, group = query.shape[3], query.shape[1] // max(1, key.shape[1])
    forced = overrides()
    best = base
    for kernel, options in candidates(d, hopper_class(query.device)).items():
        if kernel in forced or len(options) < 2:
            continue
        timings = {}
        for cfg in options:
            trial = replace(best, **{kernel: cfg}).for_group(group)
            try:
                timings[cfg] = _seconds(lambda t=trial: run(t, kernel != "fwd"), query.device)
            except Exception as exc:  # a configuration this device cannot compile or launch
                logger.info("tile configuration %s=%s skipped: %s: %s", kernel, cfg, type(exc).__name__, exc)
        if timings:
            best = replace(best, **{kernel: min(timings, key=timings.get)})
    best = best.for_group(group)
    logger.info(
        "Triton tree attention tuned for head dim %d, %s, group %d: %s",
        d,
        query.dtype,
        group,
        ", ".join(f"{k}={c}" for k, c in zip(KERNELS, best.as_tuple(), strict=True)),
    )
    return best


def _seconds(fn, device: torch.device) -> float:
    """Best of ``REPEATS`` runs after a warm-up (which compiles)."""
    fn()
    best = float("inf")
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best
