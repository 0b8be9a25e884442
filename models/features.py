"""Log-mel features for the quality evaluators (recognizer and utterance classifiers).

Why one module: the evaluators judge generated audio the same way they judge corpus audio, so
they must see it through exactly the same front end, and a change here must change their cache
keys (core.hashing.code_hash of this module).
"""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

SAMPLE_RATE = 16000
HOP = 160  # 10 ms frames


class LogMel(nn.Module):
    """(batch, samples) float audio at 16 kHz -> (batch, n_mels, frames) log-mel, 10 ms hop."""

    def __init__(self, n_mels: int = 80) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=400, win_length=400, hop_length=HOP, n_mels=n_mels,
            f_min=20.0, f_max=7600.0, power=2.0)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel(audio) + 1e-6)

    @staticmethod
    def frames(samples: int) -> int:
        """Frames the transform gives for `samples` samples (centered STFT)."""
        return samples // HOP + 1
