"""Counter-based randomness for seeded trees: every branch's uniforms are a hash of (its seed, the token index).

A branch's seed is derived from its parent's and its child index, the root's from the tree's
seed, so a seeded tree is the same whatever else is in the batch and in whatever order its
branches run. All of it is vectorised over the rows of a step: no generator object per
branch, no Python call per draw. The hash is SplitMix64's finaliser (full avalanche on
64 bits); a uniform takes its top 53 bits, so it is an exact fp64 number in [0, 1).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CHILD = np.uint64(0xD1B54A32D192ED03)
_TOKEN = np.uint64(0xAEF17502108EF2D9)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 of uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):  # wrapping is the hash
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def root_seeds(tree_seeds) -> np.ndarray:
    """uint64 seed of each tree's root node from the caller's (non-negative integer) tree seeds."""
    return mix64(np.asarray(tree_seeds, dtype=np.int64).astype(np.uint64))


def child_seeds(parent_seeds: np.ndarray, child_index: np.ndarray) -> np.ndarray:
    """Seed of child ``child_index`` of each parent (both arrays broadcast)."""
    with np.errstate(over="ignore"):
        child = np.asarray(child_index, dtype=np.int64).astype(np.uint64) * _CHILD
    return mix64(np.asarray(parent_seeds, dtype=np.uint64) ^ mix64(child))


def uniforms(seeds: np.ndarray, token_index: np.ndarray) -> np.ndarray:
    """fp64 uniforms in [0, 1): one per (branch seed, index of the token in its segment), arrays broadcast."""
    with np.errstate(over="ignore"):
        offset = (np.asarray(token_index, dtype=np.int64).astype(np.uint64) + np.uint64(1)) * _TOKEN
        bits = mix64(np.asarray(seeds, dtype=np.uint64) + offset)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
