"""Per-frame character labels of a transcript: the text stream's targets (models/s2s_transformer.py).

A CTC model's log-probs over a clip and the transcript's ids go through torchaudio's forced_align
(Viterbi over the CTC graph): every frame gets the character it lies in, or the blank (0) between
characters. Collapsing the labels (repeats merged, blanks dropped) gives the transcript back, so a
model trained on them can say its own text. The labels are then fitted to the codec's frame count.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torchaudio.functional as AF
from torch import Tensor

BLANK = 0  # the CTC blank of models.asr.GraphemeVocab, and the text stream's TEXT_PAD


def align_frames(log_probs: Tensor, targets: Sequence[int]) -> Tensor:
    """(T, V) log-probs of one clip and its transcript's ids (no blank) -> (T,) per-frame ids.

    ValueError when the transcript cannot fit in T frames (CTC needs a frame per character and
    a blank between two equal ones): a clip too short for its text."""
    frames = log_probs.shape[0]
    if not targets:
        return torch.full((frames,), BLANK, dtype=torch.long)
    repeats = sum(a == b for a, b in zip(targets, targets[1:]))
    if len(targets) + repeats > frames:
        raise ValueError(f"{len(targets)} characters do not fit in {frames} frames")
    labels, _ = AF.forced_align(log_probs[None].float().cpu(), torch.tensor([list(targets)], dtype=torch.int32),
                                blank=BLANK)
    return labels[0].long()


def fit_frames(labels: Tensor, frames: int) -> Tensor:
    """Labels cropped or padded with the blank to `frames` (the codec's count for the same clip:
    both run at 20 ms, but each front end rounds the clip's end its own way)."""
    if len(labels) >= frames:
        return labels[:frames]
    return torch.cat([labels, labels.new_full((frames - len(labels),), BLANK)])
