"""The bridge to ``treerpo._C``, the C++ tree bookkeeping: loading it, and the flat batch layout it reads.

``_C`` is used by default when it is built (``pip install -e .`` builds it). When it is not, the
Python implementations run instead, and the first fallback logs one warning. ``TREERPO_NATIVE=0``
in the environment selects the Python implementations without a warning. Every dispatching function
takes ``backend``: "auto" (the default), "native" (``_C`` or an error) or "python" (the reference).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from treerpo.tree import Tree

try:
    from treerpo import _C

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # not built: the Python reference implementations take over
    _C = None
    _IMPORT_ERROR = exc

HAVE_NATIVE = _C is not None
IMPLEMENTATIONS = ("auto", "native", "python")
logger = logging.getLogger(__name__)
_warned = False


def native_module(backend: str = "auto"):
    """``_C`` when ``backend`` selects it, else None (use the Python implementation)."""
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {IMPLEMENTATIONS}")
    if backend == "native" and _C is None:
        raise RuntimeError(f"treerpo._C is not built ({_IMPORT_ERROR}); build it with `pip install -e .`")
    if backend == "python" or (backend == "auto" and os.environ.get("TREERPO_NATIVE", "1") == "0"):
        return None
    if _C is None:
        _warn_fallback()
    return _C


def _warn_fallback():
    global _warned
    if not _warned:
        _warned = True
        logger.warning(
            "treerpo._C (the C++ tree bookkeeping) is not built: using the slower Python "
            "implementations of advantages and packing. Build it with `pip install -e .` "
            "(needs a C++ compiler). Import error: %s",
            _IMPORT_ERROR,
        )


@dataclass
class FlatTrees:
    """A batch of trees as the concatenation of their arrays: tree t owns nodes ``node_offsets[t]:node_offsets[t+1]``,
    ``parent`` stays tree-local, and ``token_offsets`` is a CSR over ``token_ids`` (one segment a node)."""

    node_offsets: np.ndarray  # int64 [T + 1]
    parent: np.ndarray  # int64 [N]
    reward: np.ndarray  # float64 [N]
    kept: np.ndarray  # bool [N]
    advantage: np.ndarray  # float64 [N]
    token_offsets: np.ndarray | None = None  # int64 [N + 1]
    token_ids: np.ndarray | None = None  # int64 [M]

    @classmethod
    def from_trees(cls, trees: Sequence[Tree], with_tokens: bool = False) -> "FlatTrees":
        sizes = np.fromiter((t.num_nodes for t in trees), dtype=np.int64, count=len(trees))
        node_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        flat = cls(
            node_offsets,
            _cat([t.parent for t in trees], np.int64),
            _cat([t.reward for t in trees], np.float64),
            _cat([t.kept for t in trees], bool),
            _cat([t.advantage for t in trees], np.float64),
        )
        if with_tokens:
            flat.token_offsets = _token_offsets(trees, node_offsets)
            flat.token_ids = _cat([t.token_ids for t in trees], np.int64)
        return flat

    def split(self, values: np.ndarray) -> list[np.ndarray]:
        """Per-node batch array -> one array (a view) per tree."""
        return np.split(values, self.node_offsets[1:-1]) if len(self.node_offsets) > 1 else []


def _cat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)


def _token_offsets(trees: Sequence[Tree], node_offsets: np.ndarray) -> np.ndarray:
    """Global CSR from the trees' own offsets (each starts at 0): drop the differences across tree boundaries."""
    if not trees:
        return np.zeros(1, dtype=np.int64)
    steps = np.diff(np.concatenate([t.offsets for t in trees]).astype(np.int64))
    boundaries = node_offsets[1:-1] + np.arange(len(trees) - 1)  # tree t's last offset -> tree t+1's first
    return np.concatenate([[0], np.cumsum(np.delete(steps, boundaries))]).astype(np.int64)
