"""Seeds of a run: every step reseeds from (seed, step) and every tree from (seed, step, prompt index), so a resumed
run draws what the uninterrupted one drew and trees do not depend on how prompts are spread over ranks."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int) -> int:
    """Every step reseeds from (seed, step), so a resumed run draws what the uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def tree_seed(seed: int, step: int, prompt_index: int) -> int:
    """A tree's own sampling seed: the trees of a step do not depend on how the prompts are spread over ranks."""
    return int(np.random.SeedSequence([seed, step, prompt_index, 1]).generate_state(1)[0])
