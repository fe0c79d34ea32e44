"""Every random stream of a training process, derived from the config's seed and saved with checkpoints.

Dropout (LoRA dropout, and the attention and residual dropout of models that train with it, such as
Seed-OSS-36B) draws from torch's global generators, which torch seeds differently in every process.
So the trainer seeds, before the first step, torch's CPU generator and every CUDA device's, Python's
`random` and numpy's global generator from (seed, rank): two runs of one config draw the same
numbers, and ranks draw independent ones. A checkpoint saves each rank's state (`state`) and a
resumption restores it (`restore`), so a resumed run draws what the uninterrupted one would have;
resumed on another number of ranks, the streams are re-derived from (seed, rank, step) instead.

The data order and the LoRA initialisation do not use these streams (they have their own seeded
generators: `engine.train.step_plan`, `engine.lora.lora_init_values`).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_all(seed: int, rank: int, step: int = 0) -> None:
    """Seed torch (CPU and every CUDA device), Python's `random` and numpy from (seed, rank, step)."""
    sequence = np.random.SeedSequence([seed, rank, step])
    torch_seed, python_seed = (int(x) for x in sequence.generate_state(2, dtype=np.uint64))
    torch.manual_seed(torch_seed)  # also seeds every CUDA device
    random.seed(python_seed)
    np.random.seed(sequence.spawn(1)[0].generate_state(4))


def state() -> dict:
    """This process's random state: torch CPU, Python, numpy, and every CUDA device's."""
    saved = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        saved["cuda"] = torch.cuda.get_rng_state_all()
    return saved


def restore(saved: dict) -> None:
    """Restore a `state()`."""
    torch.set_rng_state(saved["torch"])
    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
