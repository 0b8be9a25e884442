"""The data RNG of a training step, a function of (seed, step, rank) only.

Exact resume: the data for step N is drawn from a generator seeded with (seed, N) rather than from
an iterator's position, so a run resumed from step k replays steps k+1.. exactly as an
uninterrupted run would (the other RNG states travel in the checkpoint: core/checkpoints.py)."""

from __future__ import annotations

import torch


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The RNG for one step's data: a function of (seed, step, rank) only, so resume is exact."""
    return torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
