"""What every codec kind derives the same way from its config: hop, frame rate, bitrate, padding.

TeluCodec v1 (models/codec.py) and v2 (models/mel_codec.py) share this interface, so tokenizing,
bundles, serving and benchmarks take either; the mixin keeps the derived figures in one place.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


class CodecShape:
    """For a module with a `config` that has hop_length, frame_rate, n_codebooks, codebook_size."""

    config: object

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    def bitrate(self) -> float:
        """Bits per second of the codes: frame_rate * n_codebooks * log2(codebook_size)."""
        return self.frame_rate * self.config.n_codebooks * math.log2(self.config.codebook_size)

    def _pad(self, wav: Tensor) -> Tensor:
        """Zero-pad T on the right to a multiple of the hop, so every sample lands in a frame."""
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"expected wav of shape (batch, 1, samples), got {tuple(wav.shape)}")
        return F.pad(wav, (0, -wav.shape[-1] % self.hop_length))
