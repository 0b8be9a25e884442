"""First-audio latency of a candidate, measured through the serving code path (the engine).

Latency is what a caller waits between the end of their utterance and the first sound of the
reply. The user's audio is fed in chunks as a microphone would send it (its encoding happens
while they speak, as in the server); the clock starts at end of utterance and stops when the
first decoded frame is out. The utterances are real user turns from the test split's pairs.
The figures also carry the capacity (sessions per core) the last `s2s loadtest` recorded, when
there is one, for the gate and the sign-off report to quote.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
from tqdm import tqdm

from core.config import Params
from core.labels import EMOTIONS, SPEAKERS
from serving.bundle import ModelBundle, recorded_sampling
from serving.engine import Engine, ReplyEvent
from serving.precision import with_precision
from serving.session import GenerationSettings
from tasks.benchmarks.capacity import recorded_capacity
from tasks.data.corpus_audio import CorpusError, read_manifest


def user_turns(params: Params, count: int) -> list[tuple[np.ndarray, str, str]]:
    """(audio, reply speaker, reply emotion) of the test split's user turns, in pair order,
    cycled to `count` when the split has fewer."""
    data = params.path(params.paths.data)
    manifest = read_manifest(data).set_index("segment_id")
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == "test"] or rows
    if not rows:
        raise CorpusError(f"no pairs in {data / 'pairs.jsonl'}: the latency gate needs user turns")
    chosen = []
    for i in range(count):
        row = rows[i % len(rows)]
        audio, _ = sf.read(data / manifest.loc[row["input_segment"], "path"], dtype="float32")
        chosen.append((audio, SPEAKERS[row["reply_speaker_id"]], EMOTIONS[row["reply_emotion_id"]]))
    return chosen


def time_first_audio(engine: Engine, audio: np.ndarray, speaker: str, emotion: str, chunk: int,
                     reply_frames: int) -> tuple[float, float]:
    """Seconds from end of utterance to the first reply frame, and the real-time factor of the
    first `reply_frames` frames, for one turn through the engine the server runs. The audio is
    posted in chunks and encoded before the clock starts, as it is while a person speaks."""
    frames: list[float] = []
    enough = threading.Event()

    def emit(event: ReplyEvent) -> None:
        if event.kind == "audio":
            frames.append(time.perf_counter())
            if len(frames) >= reply_frames:
                enough.set()
        elif event.kind == "end":
            enough.set()
        else:
            raise RuntimeError(f"the engine refused a latency turn: {event.code}: {event.message}")

    conversation = engine.open(speaker, emotion, emit)
    try:
        for start in range(0, len(audio), chunk):
            engine.post_audio(conversation, audio[start: start + chunk])
        engine.wait_encoded(conversation)
        started = time.perf_counter()
        engine.post_end(conversation)
        if not enough.wait(120) or not frames:
            raise RuntimeError("the model produced no reply frame within 120 s")
    finally:
        engine.close(conversation)
    produced = len(frames[:reply_frames]) * engine.hop / engine.bundle.sample_rate
    return frames[0] - started, produced / max(frames[min(reply_frames, len(frames)) - 1] - started, 1e-9)


def measure_latency(bundle: ModelBundle, params: Params, utterances: list[tuple[np.ndarray, str, str]] | None = None,
                    ) -> dict[str, float]:
    """First-audio latency (ms: mean, p50, p95, std, min, max) over the configured utterances,
    after a few warm-up turns, one at a time through the serving engine on `latency.threads`
    torch threads (one, as one serving worker has)."""
    cfg = params.latency
    utterances = utterances or user_turns(params, cfg.utterances + cfg.warmup)
    settings = GenerationSettings.from_params(params.serving, recorded_sampling(bundle.meta))
    chunk = int(bundle.sample_rate * cfg.chunk_ms / 1000)
    firsts, rtfs = [], []
    serving = params.serving  # the server's levers: the gate measures the code path it runs
    engine = Engine(with_precision(bundle, serving.precision), settings, max_sessions=1, threads=cfg.threads,
                    ahead_ms=serving.ahead_ms, encode_hops=serving.encode_hops).start()
    try:
        for i, (audio, speaker, emotion) in enumerate(tqdm(utterances, desc="latency", unit="turn")):
            audio = audio[: int(settings.max_utterance_seconds * bundle.sample_rate)]
            first, rtf = time_first_audio(engine, audio, speaker, emotion, chunk, cfg.reply_frames)
            if i >= cfg.warmup:
                firsts.append(first * 1000)
                rtfs.append(rtf)
    finally:
        engine.stop()
    values = np.array(firsts)
    figures = {"first_audio_mean_ms": float(values.mean()), "first_audio_p50_ms": float(np.percentile(values, 50)),
               "first_audio_p95_ms": float(np.percentile(values, 95)), "first_audio_std_ms": float(values.std()),
               "first_audio_min_ms": float(values.min()), "first_audio_max_ms": float(values.max()),
               "reply_realtime_factor": float(np.median(rtfs)), "turns": float(len(values))}
    # the serving capacity the last `s2s loadtest` found (quoted by the gate, not measured here)
    return {**figures, **(recorded_capacity(params.path(params.paths.artifacts) / "loadtest.json") or {})}


def write_latency(path: Path, figures: dict[str, float]) -> None:
    from core import atomic

    atomic.write_json(path, figures)
