"""Reference codecs scored beside TeluCodec on the same audio: Opus and Codec2, through ffmpeg.

A codec's figures mean little alone; these are the systems a reviewer compares with (Codec2 is
a 1.6-3.2 kbps speech vocoder, Opus the codec of every browser call). Each round trip encodes
16-bit audio with ffmpeg's libopus or libcodec2 into its own container and decodes it back to
16 kHz. Codecs delay their output; each is scored at one lag per codec, found by
cross-correlation summed over all clips (its nominal delay), never per clip.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np


@dataclass(frozen=True)
class ReferenceCodec:
    name: str
    bitrate_bps: int
    codec: str            # ffmpeg encoder
    container: str        # file suffix of the coded stream
    options: dict         # encoder options, as ffmpeg-python takes them
    coded_rate: int       # sample rate the codec works at


REFERENCE_CODECS = {
    c.name: c for c in (
        ReferenceCodec("opus_6kbps", 6000, "libopus", "ogg", {"b:a": "6k"}, 16000),
        ReferenceCodec("codec2_1600bps", 1600, "libcodec2", "c2", {"mode": "1600"}, 8000),
        ReferenceCodec("codec2_3200bps", 3200, "libcodec2", "c2", {"mode": "3200"}, 8000),
    )
}


class BaselineError(RuntimeError):
    """ffmpeg could not run a reference codec; the message names the codec and ffmpeg's words."""


def round_trip(audio: np.ndarray, sample_rate: int, codec: ReferenceCodec) -> np.ndarray:
    """float audio in [-1, 1] -> the same audio after encoding and decoding with `codec`."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    with tempfile.TemporaryDirectory(prefix="codec-baseline-") as tmp:
        coded = Path(tmp) / f"coded.{codec.container}"
        try:
            (ffmpeg.input("pipe:", format="s16le", ar=sample_rate, ac=1)
             .output(str(coded), acodec=codec.codec, ar=codec.coded_rate, **codec.options)
             .overwrite_output().run(input=pcm, capture_stdout=True, capture_stderr=True, quiet=True))
            out, _ = (ffmpeg.input(str(coded)).output("pipe:", format="s16le", ar=sample_rate, ac=1)
                      .run(capture_stdout=True, capture_stderr=True, quiet=True))
        except ffmpeg.Error as exc:
            detail = exc.stderr.decode(errors="replace").strip().splitlines()[-1:] if exc.stderr else []
            raise BaselineError(f"{codec.name}: ffmpeg failed: {' '.join(detail) or exc}") from exc
    return np.frombuffer(out, dtype="<i2").astype(np.float32) / 32768.0


def _envelope(x: np.ndarray, width: int = 160) -> np.ndarray:
    """Energy envelope (10 ms moving average of x^2 at 16 kHz), mean removed: blind to phase.

    10 ms: shorter windows follow pitch pulses (Codec2 lags drifted 115-500 samples), longer
    ones blur onsets (Opus, 3 samples late, came out 10-24)."""
    e = np.convolve(x.astype(np.float64) ** 2, np.ones(width) / width, mode="same")
    return e - e.mean()


def nominal_lag(pairs: list[tuple[np.ndarray, np.ndarray]], max_lag: int) -> int:
    """The lag (samples, output behind input) maximising the cross-correlation of the energy
    envelopes, summed over all pairs. Envelopes, not waveforms: a vocoder picks its own phase,
    so waveform correlation peaks at the wrong lags for it."""
    total = np.zeros(2 * max_lag + 1)
    for ref, est in pairs:
        n = min(len(ref), len(est))
        ref, est = _envelope(ref[:n]), _envelope(est[:n])
        size = 1 << int(np.ceil(np.log2(2 * n + 1)))
        corr = np.fft.irfft(np.fft.rfft(est[:n], size) * np.conj(np.fft.rfft(ref[:n], size)), size)
        total += np.concatenate([corr[-max_lag:], corr[: max_lag + 1]])
    return int(np.argmax(total)) - max_lag


def align(ref: np.ndarray, est: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """(ref, est) cut so that est[i] is the reconstruction of ref[i], given est lags by `lag`."""
    if lag >= 0:
        est = est[lag:]
    else:
        ref = ref[-lag:]
    n = min(len(ref), len(est))
    return ref[:n], est[:n]
