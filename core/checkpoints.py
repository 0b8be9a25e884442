"""Checkpoint files: one convention for every torch file the project writes and reads back.

A checkpoint is a dict saved with torch.save, written atomically (temporary file, then rename) so
a kill mid-write leaves the previous one intact. Training checkpoints also hold every RNG state,
which is what makes a resumed run replay its steps exactly; model files (the evaluators') that
never resume leave them out and so load with weights_only=True.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import atomic


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, with_rng: bool = True, **payload: Any) -> Path:
    """Atomically write `payload` (model/optimizer states, step, config...) as one torch file;
    `with_rng` adds the RNG states a resumed run needs (a file that holds them must be read with
    weights_only=False)."""
    with atomic.atomic_path(Path(path), suffix=".pt") as tmp:
        torch.save({**payload, "rng": rng_state()} if with_rng else payload, tmp)
    return Path(path)


def load_checkpoint(path: Path, *, weights_only: bool = False) -> dict[str, Any]:
    """The dict save_checkpoint wrote, on the CPU; FileNotFoundError when there is no file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=weights_only)
