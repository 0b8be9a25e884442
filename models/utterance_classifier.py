"""Utterance classifiers (emotion, speaker): the judges of emotion and speaker control.

One clip in, one label out: log-mel (models.features.LogMel, the evaluators' one front end), a
small stack of dilated 1-D convolutions over time (mel bins as channels, receptive field ~0.3 s:
syllables, pitch movements, pauses), masked statistics pooling (mean and standard deviation of
each channel over the clip's real frames) and one linear layer to the labels, whose names are
stored with the model and its checkpoint.

Loudness. The corpus is loudness-normalised per recording, so the level a clip has on disk says
nothing about its emotion (and generated audio comes at whatever level the codec gives). The
model is therefore blind to absolute level: each clip is scaled to a fixed RMS (over its real
samples, padding excluded) before the log-mel, so a gain applied to a clip changes nothing (up to
float rounding). What remains of loudness is *relative*: how loud a clip's stressed syllables are
against its quiet ones and its spectral balance, which is what differs between emotions once
levels are normalised. (Training adds random gain all the same; it costs nothing.)
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from core.checkpoints import load_checkpoint, save_checkpoint
from models.features import HOP, SAMPLE_RATE, LogMel

FORMAT = "telugu-s2s/utterance-classifier"
FORMAT_VERSION = 1
REFERENCE_RMS = 0.1  # every clip is scaled to -20 dBFS RMS before its log-mel
DILATIONS = (1, 2, 4, 8)  # kernel 5 then 3s: receptive field 1 + 4 + 2 * (2 + 4 + 8) = 33 frames
PREDICT_BATCH = 16


class ClassifierFileError(ValueError):
    """A classifier checkpoint that is missing, unreadable or not an utterance classifier."""


class UtteranceClassifier(nn.Module):
    """(batch, samples) float audio at 16 kHz (+ lengths) -> (batch, len(labels)) logits."""

    def __init__(self, labels: Sequence[str], n_mels: int = 64, channels: int = 96) -> None:
        super().__init__()
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a classifier needs at least 2 distinct labels, got {list(labels)}")
        self.labels = list(labels)
        self.n_mels = n_mels
        self.channels = channels
        self.features = LogMel(n_mels)
        layers: list[nn.Module] = []
        width = n_mels
        for index, dilation in enumerate(DILATIONS):
            kernel = 5 if index == 0 else 3
            layers.append(nn.Sequential(
                nn.Conv1d(width, channels, kernel, dilation=dilation, padding=dilation * (kernel // 2)),
                nn.BatchNorm1d(channels), nn.ReLU()))
            width = channels
        self.convs = nn.ModuleList(layers)
        self.head = nn.Linear(2 * channels, len(self.labels))

    def config_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "n_mels": self.n_mels, "channels": self.channels}

    def level_normalised(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, M, T) log-mel of each row scaled to REFERENCE_RMS over its first lengths[b] samples."""
        real = torch.arange(audio.shape[-1], device=audio.device)[None, :] < lengths[:, None]
        power = (audio ** 2 * real).sum(-1) / lengths.clamp(min=1)
        return self.features(audio * (REFERENCE_RMS / torch.sqrt(power + 1e-12))[:, None])

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; `lengths` (samples per row) marks zero padding, which pooling leaves out."""
        return self.head(self.embed(audio, lengths))

    def embed(self, audio: torch.Tensor, lengths: torch.Tensor | None = None,
              mel_shift: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, 2 * channels) pooled statistics: what the linear head reads. `mel_shift`
        (training only: bins per row, fractional) moves each row's features along the mel axis."""
        frames = LogMel.frames(audio.shape[-1])
        if lengths is None:
            lengths = torch.full((audio.shape[0],), audio.shape[-1], device=audio.device)
        lengths = lengths.to(audio.device).clamp(max=audio.shape[-1])
        mask = torch.arange(frames, device=audio.device)[None, :] < (lengths // HOP + 1)[:, None]
        x = self.level_normalised(audio, lengths) * mask[:, None, :]
        if mel_shift is not None:
            x = shift_mel(x, mel_shift.to(x.device)) * mask[:, None, :]
        maskf = mask[:, None, :].float()
        for layer in self.convs:
            x = layer(x) * maskf
        count = maskf.sum(-1).clamp(min=1)
        mean = x.sum(-1) / count
        var = ((x - mean[..., None]) ** 2 * maskf).sum(-1) / count
        return torch.cat([mean, torch.sqrt(var + 1e-5)], dim=1)

    @torch.inference_mode()
    def predict_proba(self, clips: Sequence[np.ndarray], batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """(len(clips), len(labels)) probabilities; whole clips, batched by similar length."""
        if len(clips) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = np.zeros((len(clips), len(self.labels)), np.float32)
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start: start + batch_size]
                audios = [_as_audio(clips[i]) for i in chunk]
                lengths = torch.tensor([len(a) for a in audios])
                batch = torch.zeros(len(audios), int(lengths.max()))
                for row, audio in enumerate(audios):
                    batch[row, : len(audio)] = torch.from_numpy(audio)
                probs = torch.softmax(self(batch.to(device), lengths.to(device)).float(), dim=-1)
                out[chunk] = probs.cpu().numpy()
        finally:
            self.train(was_training)
        return out

    def predict(self, clips: Sequence[np.ndarray], batch_size: int = PREDICT_BATCH) -> list[str]:
        """The label of each 16 kHz float32 clip (scored whole, however long)."""
        probs = self.predict_proba(clips, batch_size)
        return [self.labels[i] for i in probs.argmax(axis=1)] if len(probs) else []


def shift_mel(features: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(B, M, T) features moved by `shift[b]` mel bins (fractional: linear interpolation, edges
    repeated): a voice a little higher or lower, its formants and pitch together. Used as a
    training augmentation so that a judge of emotion leans less on who is speaking."""
    batch, bins, frames = features.shape
    source = (torch.arange(bins, device=features.device)[None, :] - shift[:, None]).clamp(0, bins - 1)
    low = source.floor().long()
    high = (low + 1).clamp(max=bins - 1)
    weight = (source - low)[..., None]
    low_rows = torch.gather(features, 1, low[..., None].expand(batch, bins, frames))
    high_rows = torch.gather(features, 1, high[..., None].expand(batch, bins, frames))
    return low_rows * (1 - weight) + high_rows * weight


def _as_audio(clip: np.ndarray) -> np.ndarray:
    audio = np.asarray(clip)
    if audio.dtype == np.int16:
        audio = audio.astype(np.float32) / 32768.0
    audio = audio.astype(np.float32, copy=False).reshape(-1)
    if audio.size < HOP:
        raise ValueError(f"a clip of {audio.size} samples is too short to classify (at least {HOP} at "
                         f"{SAMPLE_RATE} Hz)")
    return audio


def save_classifier(path: Path, model: UtteranceClassifier, config: dict[str, Any] | None = None) -> Path:
    """Atomically write the model (weights, labels, architecture) and `config` (the training
    settings, for the record) to `path`."""
    return save_checkpoint(Path(path), with_rng=False, format=FORMAT, version=FORMAT_VERSION,
                           model=model.config_dict(),
                           state={k: v.detach().cpu() for k, v in model.state_dict().items()},
                           config=dict(config or {}))


def load_classifier(path: Path, device: str | torch.device = "cpu") -> UtteranceClassifier:
    """A classifier written by save_classifier, in eval mode; ClassifierFileError (a ValueError)
    for a file that is not one, FileNotFoundError when there is no file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no utterance classifier at {path}: train one with tasks.evaluation.train_classifier")
    try:
        payload = load_checkpoint(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        raise ClassifierFileError(f"{path} is not an utterance classifier checkpoint (unreadable: "
                                  f"{type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ClassifierFileError(f"{path} is not an utterance classifier checkpoint (no {FORMAT!r} marker)")
    if payload.get("version") != FORMAT_VERSION:
        raise ClassifierFileError(f"{path} is an utterance classifier of format version {payload.get('version')}, "
                                  f"this code reads version {FORMAT_VERSION}")
    model = UtteranceClassifier(**payload["model"])
    model.load_state_dict(payload["state"])
    return model.to(device).eval()
