"""Normalize a downloaded recording with ffmpeg: mono, 16 kHz, 16-bit WAV, loudness-normalized.

Also keeps what normalization would hide: the level and clipping of the recording *as delivered*
(per 10 ms frame, in a .levels.npz beside the WAV), so the quality checks can still catch a
near-silent or clipped source after its loudness was evened out. The gain is linear (measured
with ITU-R BS.1770, capped by the peak), so no dynamics are changed. A file that ffmpeg cannot
read, has no audio, or decodes shorter than its header declares is refused with a message that
says which.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import ffmpeg
import numpy as np
import torch
import torchaudio.functional as AF

from core import atomic
from core.config import NormalizeConfig
from core.hashing import code_hash, file_sha256
from tasks.data.pinned_numerics import ffmpeg_args, pinned


class MediaError(ValueError):
    """A recording that cannot be normalized; the message names the file and the problem, and
    `code` says which problem it is (unreadable, no_audio, corrupt, truncated)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class NormalizedRecording:
    recording_id: str
    source_id: str
    wav_path: Path
    levels_path: Path
    duration_s: float
    declared_duration_s: float
    original_sample_rate: int
    original_channels: int
    codec: str
    loudness_lufs: float
    gain_db: float
    input_sha256: str




def _last_line(stderr: bytes | None) -> str:
    lines = [l for l in (stderr or b"").decode(errors="replace").strip().splitlines() if l.strip()]
    return lines[-1] if lines else "unknown ffmpeg error"


def wav_durations(path: Path) -> tuple[float, float] | None:
    """(declared, present) seconds of a WAV's data chunk, or None if the file is not a WAV.

    ffprobe and libsndfile both derive a WAV's duration from the file size, so a cut-off WAV
    looks whole to them; the header's data size still tells what was meant to be there.
    """
    with open(path, "rb") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        byte_rate = None
        while len(chunk := handle.read(8)) == 8:
            name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"fmt ":
                byte_rate = struct.unpack("<I", handle.read(size)[8:12])[0]
                continue
            if name == b"data":
                if not byte_rate or size == 0xFFFFFFFF:  # streamed WAV: size unknown
                    return None
                present = path.stat().st_size - handle.tell()
                return size / byte_rate, min(size, present) / byte_rate
            handle.seek(size + (size & 1), 1)
    return None


def probe_audio(path: Path) -> dict:
    """The first audio stream and the container duration, or a MediaError naming the problem."""
    try:
        info = ffmpeg.probe(str(path))
    except ffmpeg.Error as exc:
        raise MediaError("unreadable", f"{path.name}: unreadable media ({_last_line(exc.stderr)})") from exc
    streams = [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]
    if not streams:
        raise MediaError("no_audio", f"{path.name}: no audio stream in the file")
    stream = streams[0]
    duration = float(stream.get("duration") or info.get("format", {}).get("duration") or 0.0)
    return {"sample_rate": int(stream["sample_rate"]), "channels": int(stream.get("channels", 1)),
            "codec": stream.get("codec_name", "?"), "duration": duration}


def decode(path: Path, sample_rate: int | None = None, gain_db: float = 0.0,
           max_seconds: float | None = None) -> np.ndarray:
    """Decode to float32 mono with ffmpeg (resampled and gained when asked); decode errors raise.
    `max_seconds` stops the decoder there, so a file whose header understates its length cannot
    fill the memory."""
    output_args = {"format": "f32le", "ac": 1}
    if max_seconds:
        output_args["t"] = f"{max_seconds:.3f}"
    if sample_rate:
        output_args["ar"] = sample_rate
    stream = ffmpeg.input(str(path))
    if gain_db:
        stream = stream.filter("volume", f"{gain_db:.4f}dB")
    try:
        out, err = (stream.output("pipe:", **output_args)
                    .global_args("-v", "error", "-nostdin", *ffmpeg_args())
                    .run(capture_stdout=True, capture_stderr=True))
    except ffmpeg.Error as exc:
        raise MediaError("unreadable", f"{path.name}: ffmpeg cannot decode it ({_last_line(exc.stderr)})") from exc
    if err.strip():
        raise MediaError("corrupt", f"{path.name}: corrupt audio data ({_last_line(err)})")
    return np.frombuffer(out, dtype="<f4").copy()


def frame_levels(audio: np.ndarray, sample_rate: int, frame_ms: int = 10) -> dict[str, np.ndarray]:
    """Per-frame RMS level (dBFS) and clipped-sample fraction of audio as recorded.

    A sample counts as clipped when it sits in a run of 3+ equal samples at 99% of the
    recording's peak or above: the flat tops a saturated recording leaves, whatever gain was
    applied after the saturation.
    """
    hop = max(1, sample_rate * frame_ms // 1000)
    n = len(audio) // hop
    frames = audio[: n * hop].reshape(n, hop).astype(np.float64)
    rms_db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    near_peak = np.abs(audio) >= 0.99 * peak if peak > 0 else np.zeros(len(audio), bool)
    flat = np.zeros(len(audio), bool)
    if len(audio) >= 3:
        same = (audio[1:-1] == audio[:-2]) & (audio[1:-1] == audio[2:])
        flat[1:-1] |= same
        flat[:-2] |= same
        flat[2:] |= same
    clipped = (near_peak & flat)[: n * hop].reshape(n, hop).mean(axis=1)
    return {"frame_s": np.float64(frame_ms / 1000), "rms_db": rms_db.astype(np.float32),
            "clip_fraction": clipped.astype(np.float32)}


def _input_key(media: Path, cfg: NormalizeConfig, frame_ms: int) -> str:
    params = json.dumps({"sr": cfg.sample_rate, "lufs": cfg.loudness_lufs, "tp": cfg.true_peak_db,
                         "frame_ms": frame_ms, "code": code_hash(sys.modules[__name__])}, sort_keys=True)
    return hashlib.sha256((file_sha256(media) + params).encode()).hexdigest()


def normalize_recording(media: Path, recording_id: str, source_id: str, cfg: NormalizeConfig,
                        out_dir: Path, frame_ms: int = 10) -> NormalizedRecording:
    """Normalize one file, or reuse the earlier result when file and settings are unchanged."""
    base = out_dir / source_id / recording_id
    meta_path = base.with_suffix(".json")
    key = _input_key(media, cfg, frame_ms)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("input_sha256") == key and Path(meta["wav_path"]).is_file():
            return NormalizedRecording(**{**meta, "wav_path": Path(meta["wav_path"]),
                                          "levels_path": Path(meta["levels_path"])})

    info = probe_audio(media)
    wav = wav_durations(media)
    if wav and wav[1] < wav[0] * (1 - cfg.truncation_tolerance) - 0.05:
        raise MediaError("truncated", f"{media.name}: truncated: the header declares {wav[0]:.1f} s of audio, "
                         f"the file holds {wav[1]:.1f} s")
    too_long = (f"{media.name}: too long: %.1f h of audio, more than normalize.max_duration_s "
                f"({cfg.max_duration_s / 3600:.1f} h); split it into shorter recordings")
    if max(wav[0] if wav else 0.0, info["duration"]) > cfg.max_duration_s:
        raise MediaError("too_long", too_long % (max(wav[0] if wav else 0.0, info["duration"]) / 3600))
    raw = decode(media, max_seconds=cfg.max_duration_s + 1)
    if raw.size == 0:
        raise MediaError("no_audio", f"{media.name}: decodes to no audio samples")
    decoded_s = raw.size / info["sample_rate"]
    if decoded_s > cfg.max_duration_s:  # the header said less than the file holds
        raise MediaError("too_long", too_long % (decoded_s / 3600))
    declared_s = wav[0] if wav else info["duration"] or decoded_s
    if decoded_s < declared_s * (1 - cfg.truncation_tolerance) - 0.05:
        raise MediaError("truncated", f"{media.name}: truncated: the header declares {declared_s:.1f} s of audio, "
                         f"only {decoded_s:.1f} s can be decoded")
    levels = frame_levels(raw, info["sample_rate"], frame_ms)

    sr = info["sample_rate"]
    loudness = float(AF.loudness(torch.from_numpy(raw).unsqueeze(0), sr)) if raw.size > sr // 2 else -70.0
    if not np.isfinite(loudness):
        loudness = -70.0
    peak_db = 20 * np.log10(float(np.abs(raw).max()) + 1e-9)
    gain_db = min(cfg.loudness_lufs - loudness, cfg.true_peak_db - peak_db)
    audio = decode(media, sample_rate=cfg.sample_rate, gain_db=gain_db)

    wav_path, levels_path = base.with_suffix(".wav"), base.with_suffix(".levels.npz")
    atomic.write_wav(wav_path, np.clip(audio, -1.0, 1.0), cfg.sample_rate)
    with atomic.atomic_path(levels_path, suffix=".npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **levels)
    result = NormalizedRecording(
        recording_id=recording_id, source_id=source_id, wav_path=wav_path, levels_path=levels_path,
        duration_s=len(audio) / cfg.sample_rate, declared_duration_s=declared_s,
        original_sample_rate=info["sample_rate"], original_channels=info["channels"],
        codec=info["codec"], loudness_lufs=loudness, gain_db=gain_db, input_sha256=key,
    )
    atomic.write_json(meta_path, asdict(result))
    return result


@pinned()
def normalize_all(recordings: list, cfg: NormalizeConfig, out_dir: Path, frame_ms: int = 10
                  ) -> tuple[list[NormalizedRecording], dict[str, dict[str, str]]]:
    """Normalize every downloaded recording; a bad file is recorded with its reason, the rest go on."""
    from tqdm import tqdm

    done: list[NormalizedRecording] = []
    failures: dict[str, dict[str, str]] = {}
    for rec in tqdm(recordings, desc="normalize", unit="file"):
        try:
            done.append(normalize_recording(rec.media_path, rec.recording_id, rec.source_id, cfg, out_dir, frame_ms))
        except MediaError as exc:
            failures[rec.recording_id] = {"source_id": rec.source_id, "code": exc.code, "error": str(exc)}
    return done, failures
