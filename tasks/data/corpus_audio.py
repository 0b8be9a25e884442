"""Reading the versioned corpus for training: split clips in memory, batches drawn per step.

The smoke corpus is well under an hour of 16 kHz audio, so a split fits in memory as int16;
batches are drawn from a per-step generator (tasks.training.step_generator) so that any step's
batch can be re-drawn exactly after a resume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch


class CorpusError(ValueError):
    """The corpus on disk is missing or unusable; the message says what to run."""


def read_manifest(data_dir: Path) -> pd.DataFrame:
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        raise CorpusError(f"no corpus manifest at {manifest}: run `s2s flow data` first")
    rows = pd.read_csv(manifest)
    if "text" in rows:
        rows["text"] = rows["text"].fillna("")  # "" = the segment's text is unknown
    return rows


def load_clips(data_dir: Path, split: str, limit: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """int16 audio of every kept segment of one split (sorted by id), and their segment ids."""
    rows = read_manifest(data_dir)
    rows = rows[rows["split"] == split].sort_values("segment_id")
    if limit is not None:
        rows = rows.head(limit)
    if rows.empty:
        raise CorpusError(f"the corpus at {data_dir} has no segments in split {split!r}")
    clips = [sf.read(data_dir / path, dtype="int16")[0] for path in rows["path"]]
    return clips, list(rows["segment_id"])


def random_crops(clips: list[np.ndarray], batch: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 1, samples) float crops at random clips and offsets (short clips zero-padded)."""
    picks = torch.randint(len(clips), (batch,), generator=generator).tolist()
    out = torch.zeros(batch, 1, samples)
    for row, index in enumerate(picks):
        clip = clips[index]
        start = int(torch.randint(max(1, len(clip) - samples + 1), (1,), generator=generator))
        piece = torch.from_numpy(clip[start: start + samples].astype(np.float32) / 32768.0)
        out[row, 0, : len(piece)] = piece
    return out
