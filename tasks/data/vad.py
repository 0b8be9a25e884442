"""Voice activity detection with Silero VAD (its model ships inside the silero-vad package).

Why lanes: Silero is a small recurrent model stepped over 32 ms chunks; one recording stepped
chunk by chunk runs at about 70x real time on two cores. Cutting the recording into L lanes
and stepping all lanes at once as one batch keeps the model's per-step cost almost flat, so a
recording runs about L times faster. Each lane starts with a few chunks of the audio before it
(discarded afterwards) so its recurrent state has warmed up on real context, as it would have
in one long pass. The speech probabilities then go through silero's own timestamp logic.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

_threads = torch.get_num_threads()
from silero_vad import load_silero_vad  # noqa: E402  (its import sets torch to 1 thread, globally)
from silero_vad.utils_vad import get_speech_timestamps_from_probs  # noqa: E402

torch.set_num_threads(_threads)  # give the process its threads back (training shares it)

SAMPLE_RATE = 16000
CHUNK = 512  # samples per Silero step at 16 kHz (32 ms)
_local = threading.local()


def _model() -> torch.jit.ScriptModule:
    """One model per thread: the model carries recurrent state between calls."""
    if getattr(_local, "model", None) is None:
        _local.model = load_silero_vad(onnx=False)
    return _local.model


@contextmanager
def _one_thread() -> Iterator[None]:
    """Silero's steps are tiny ops: two intra-op threads thrash on them (measured here: 363x real
    time on one thread, 8x on two), so the VAD pass runs on one and gives the threads back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def speech_probabilities(audio: np.ndarray, lanes: int = 64, warmup_chunks: int = 16) -> np.ndarray:
    """Speech probability for every 32 ms chunk of 16 kHz mono audio."""
    with _one_thread():
        return _speech_probabilities(audio, lanes, warmup_chunks)


def _speech_probabilities(audio: np.ndarray, lanes: int, warmup_chunks: int) -> np.ndarray:
    n_chunks = int(np.ceil(len(audio) / CHUNK))
    if n_chunks == 0:
        return np.zeros(0, np.float32)
    lanes = max(1, min(lanes, n_chunks // max(warmup_chunks, 1) or 1))
    per_lane = int(np.ceil(n_chunks / lanes))
    padded = np.zeros((warmup_chunks + lanes * per_lane) * CHUNK, np.float32)
    padded[warmup_chunks * CHUNK: warmup_chunks * CHUNK + len(audio)] = audio
    chunks = torch.from_numpy(padded).view(-1, CHUNK)
    # lane l holds chunks [l*per_lane - warmup, (l+1)*per_lane) of the original timeline
    index = torch.arange(lanes)[:, None] * per_lane + torch.arange(warmup_chunks + per_lane)[None, :]
    batch = chunks[index]  # (lanes, steps, CHUNK)
    model = _model()
    model.reset_states()
    probs = torch.stack([model(batch[:, step], SAMPLE_RATE)[:, 0] for step in range(batch.shape[1])], dim=1)
    return probs[:, warmup_chunks:].reshape(-1)[:n_chunks].numpy().astype(np.float32)


def speech_regions(probs: np.ndarray, n_samples: int, threshold: float, min_silence_ms: int,
                   speech_pad_ms: int, min_speech_ms: int = 250) -> list[tuple[float, float]]:
    """Speech regions in seconds from chunk probabilities (silero's hysteresis and padding)."""
    stamps = get_speech_timestamps_from_probs(
        probs.tolist(), sampling_rate=SAMPLE_RATE, threshold=threshold,
        min_speech_duration_ms=min_speech_ms, min_silence_duration_ms=min_silence_ms,
        speech_pad_ms=speech_pad_ms, audio_length_samples=n_samples,
    )
    return [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]
