"""Per-segment quality metrics: duration, level, estimated SNR, clipping and silence ratios.

The level and clipping come from the recording *as delivered* (the .levels.npz the normalizer
keeps), since loudness normalization would hide a near-silent or saturated source. SNR and
silence are estimated on the normalized audio: the noise floor is the mean power of the
recording's frames that VAD calls non-speech, the signal the mean power of the segment's speech
frames above that floor: SNR = 10 log10((P_speech - P_noise) / P_noise). That is the definition
the synthetic corpus mixes its noise with, so tests can check the estimate against the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.data.vad import CHUNK, SAMPLE_RATE

FRAME = SAMPLE_RATE // 100  # 10 ms


@dataclass(frozen=True)
class RecordingPower:
    """What the per-segment metrics need from the whole recording, computed once."""

    frame_power: np.ndarray  # mean square per 10 ms frame of the normalized audio
    speech_frames: np.ndarray  # bool per 10 ms frame: VAD speech probability >= threshold
    noise_power: float


def recording_power(audio: np.ndarray, probs: np.ndarray, threshold: float) -> RecordingPower:
    n = len(audio) // FRAME
    power = np.mean(audio[: n * FRAME].astype(np.float64).reshape(n, FRAME) ** 2, axis=1)
    chunk_of_frame = np.minimum((np.arange(n) * FRAME) // CHUNK, max(len(probs) - 1, 0))
    speech = probs[chunk_of_frame] >= threshold if len(probs) else np.zeros(n, bool)
    # frames well away from speech (VAD prob < 0.1) give the noise floor
    quiet = probs[chunk_of_frame] < 0.1 if len(probs) else np.ones(n, bool)
    if quiet.sum() >= 50:
        noise = float(np.mean(power[quiet]))
    else:  # speech everywhere: the quietest 5% of frames are the best floor estimate left
        noise = float(np.mean(np.sort(power)[: max(1, n // 20)]))
    return RecordingPower(power, speech, max(noise, 1e-12))


def segment_metrics(start: float, end: float, rec: RecordingPower, levels: dict[str, np.ndarray]) -> dict[str, float]:
    a, b = int(start * 100), max(int(start * 100) + 1, int(end * 100))
    power = rec.frame_power[a:b]
    speech = rec.speech_frames[a:b]
    speech_power = float(np.mean(power[speech])) if speech.any() else float(np.mean(power))
    snr = 10 * np.log10(max(speech_power - rec.noise_power, 1e-12) / rec.noise_power)
    dbfs = 10 * np.log10(float(np.mean(power)) + 1e-12)
    # silence: frames within 6 dB of the noise floor, or 35 dB under the segment's loud frames
    loud = np.percentile(power, 95) if power.size else 0.0
    silent = (power < rec.noise_power * 4) | (power < loud * 10 ** (-35 / 10))
    frame_s = float(levels["frame_s"])
    ra, rb = int(start / frame_s), max(int(start / frame_s) + 1, int(end / frame_s))
    raw_db = levels["rms_db"][ra:rb]
    raw_dbfs = 10 * np.log10(float(np.mean(10 ** (raw_db.astype(np.float64) / 10))) + 1e-12) if raw_db.size else -120.0
    clip = levels["clip_fraction"][ra:rb]
    return {
        "duration_s": round(end - start, 3),
        "dbfs": round(dbfs, 2),
        "raw_dbfs": round(raw_dbfs, 2),
        "snr_db": round(float(snr), 2),
        "clipping_ratio": round(float(clip.mean()) if clip.size else 0.0, 5),
        "silence_ratio": round(float(silent.mean()) if silent.size else 1.0, 4),
    }
