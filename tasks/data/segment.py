"""Cut a normalized recording into speaker-labelled segments of 1-15 s, with quality metrics.

Speech regions come from Silero VAD (default) or from a pyannote.audio diarization pipeline
when one is configured (`segment.backend: pyannote` with a local pipeline or a hub id and
HF_TOKEN). Regions are labelled by speaker, regions of one speaker closer than `merge_gap_s`
are joined, regions longer than `max_segment_s` are split at their quietest point, and every
segment gets its quality metrics. Nothing is dropped here: a segment that is too short or too
noisy is kept with its metrics, and the quality step quarantines it with the reason.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

from core import atomic
from core.config import SegmentConfig
from core.hashing import code_hash
from tasks.data import signal_figures, speakers, vad
from tasks.data.normalize import NormalizedRecording
from tasks.data.pinned_numerics import pinned
from tasks.data.signal_figures import recording_power, segment_metrics
from tasks.data.sources import Source
from tasks.data.vad import CHUNK, SAMPLE_RATE, speech_probabilities, speech_regions

Diarizer = Callable[[np.ndarray], list[tuple[float, float, str]]]


@dataclass(frozen=True)
class LabelledRegion:
    start: float
    end: float
    label: int


def merge_regions(regions: list[LabelledRegion], gap: float) -> list[LabelledRegion]:
    """Join consecutive regions of one speaker separated by less than `gap` seconds."""
    merged: list[LabelledRegion] = []
    for region in regions:
        if merged and merged[-1].label == region.label and region.start - merged[-1].end < gap:
            merged[-1] = LabelledRegion(merged[-1].start, max(merged[-1].end, region.end), region.label)
        else:
            merged.append(region)
    return merged


def split_long(region: LabelledRegion, probs: np.ndarray, max_s: float, min_s: float) -> list[LabelledRegion]:
    """Split a region longer than max_s at its least speech-like point, recursively."""
    if region.end - region.start <= max_s:
        return [region]
    chunk_s = CHUNK / SAMPLE_RATE
    lo = int((region.start + min_s) / chunk_s)
    hi = int((region.end - min_s) / chunk_s)
    if hi <= lo:
        cut = (region.start + region.end) / 2
    else:
        cut = (lo + int(np.argmin(probs[lo:hi]))) * chunk_s + chunk_s / 2
    left = LabelledRegion(region.start, cut, region.label)
    right = LabelledRegion(cut, region.end, region.label)
    return split_long(left, probs, max_s, min_s) + split_long(right, probs, max_s, min_s)


def _cache_key(rec: NormalizedRecording, source: Source, seg: SegmentConfig) -> str:
    """Inputs, settings and code of the segmentation (quality thresholds apply later, so they
    are not part of it: changing one re-runs the quality step, not the segmentation)."""
    payload = json.dumps({
        "rec": rec.input_sha256, "speakers": source.speakers, "emotion": source.emotion,
        "segment": seg.model_dump(mode="json", exclude={"out_dir"}),
        "code": code_hash(sys.modules[__name__], speakers, vad, signal_figures),
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def segment_recording(rec: NormalizedRecording, source: Source, seg: SegmentConfig,
                      out_dir: Path, diarizer: Diarizer | None = None) -> list[dict]:
    """Segment rows (times, speaker, metrics) for one recording; cached by input and settings."""
    cache = out_dir / source.id / f"{rec.recording_id}.segments.json"
    key = _cache_key(rec, source, seg)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["segments"]

    audio, rate = sf.read(rec.wav_path, dtype="float32")
    if rate != SAMPLE_RATE:
        raise ValueError(f"{rec.wav_path}: expected {SAMPLE_RATE} Hz audio, got {rate} Hz")
    with np.load(rec.levels_path) as handle:
        levels = {k: handle[k] for k in handle.files}
    rows = segment_audio(audio, levels, source, rec.recording_id, seg, diarizer)
    atomic.write_json(cache, {"key": key, "wav_path": str(rec.wav_path), "segments": rows})
    return rows


def segment_audio(audio: np.ndarray, levels: dict[str, np.ndarray], source: Source, recording_id: str,
                  seg: SegmentConfig, diarizer: Diarizer | None = None) -> list[dict]:
    """The segmentation itself, on 16 kHz audio in memory: regions, speakers, metrics."""
    probs = speech_probabilities(audio, lanes=seg.vad_lanes)
    power = recording_power(audio, probs, seg.vad_threshold)
    mfcc, pitch = speakers.frame_features(audio)
    if diarizer is not None:
        turns = diarizer(audio)
        order = list(dict.fromkeys(t[2] for t in turns))
        raw = [LabelledRegion(s, e, order.index(n)) for s, e, n in turns]
        _, medians = speakers.region_embeddings(mfcc, pitch, [(r.start, r.end) for r in raw])
        labels = np.array([r.label for r in raw], int)
    else:
        spans = speech_regions(probs, len(audio), seg.vad_threshold, seg.min_silence_ms, seg.speech_pad_ms)
        vectors, medians = speakers.region_embeddings(mfcc, pitch, spans)
        n_known = len(source.speakers) if source.speakers else None
        labels = speakers.cluster(vectors, n_known, seg.max_speakers)
        raw = [LabelledRegion(s, e, int(l)) for (s, e), l in zip(spans, labels)]
    durations = np.array([r.end - r.start for r in raw])
    names = speakers.name_clusters(labels, medians, durations, source.speakers)

    regions = merge_regions(raw, seg.merge_gap_s)
    regions = [part for r in regions for part in split_long(r, probs, seg.max_segment_s, seg.min_segment_s)]
    return [{
        "segment_id": f"{recording_id}--{index:04d}",
        "recording_id": recording_id,
        "source_id": source.id,
        "start": round(region.start, 3),
        "end": round(region.end, 3),
        "speaker_label": f"spk{region.label}",
        "speaker": names[region.label],
        "emotion": source.emotion,
        **segment_metrics(region.start, region.end, power, levels),
    } for index, region in enumerate(regions)]


def _without_diarizer(*args, **kwargs) -> bool:
    """Silero runs pinned in a child process; a pyannote pipeline object stays in this one."""
    return (args[4] if len(args) > 4 else kwargs.get("diarizer")) is None


@pinned(when=_without_diarizer)
def segment_all(recordings: list[NormalizedRecording], sources: dict[str, Source], seg: SegmentConfig,
                out_dir: Path, diarizer: Diarizer | None = None
                ) -> tuple[list[dict], dict[str, dict[str, str]]]:
    """Segment every recording; one that fails is recorded with its reason, the rest go on."""
    from tqdm import tqdm

    rows: list[dict] = []
    failures: dict[str, dict[str, str]] = {}
    for rec in tqdm(recordings, desc="segment", unit="file"):
        try:
            found = segment_recording(rec, sources[rec.source_id], seg, out_dir, diarizer)
        except Exception as exc:  # one broken recording must not stop the corpus
            failures[rec.recording_id] = {"source_id": rec.source_id, "code": "segmentation_failed",
                                          "error": f"{rec.recording_id}: {type(exc).__name__}: {exc}"}
            continue
        if not found:
            failures[rec.recording_id] = {"source_id": rec.source_id, "code": "no_speech",
                                          "error": f"{rec.recording_id}: VAD found no speech"}
        rows.extend(found)
    return rows, failures
