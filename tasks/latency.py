"""First-audio latency of a candidate, measured through the serving code path (ReplySession).

Latency is what a caller waits between the end of their utterance and the first sound of the
reply. The user's audio is fed in chunks as a microphone would send it (its encoding happens
while they speak, as in the server); the clock starts at end of utterance and stops when the
first decoded frame is out. The utterances are real user turns from the test split's pairs.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from s2s.config import Params
from s2s.labels import EMOTIONS, SPEAKERS
from serving.bundle import ModelBundle
from serving.session import GenerationSettings, ReplySession
from tasks.corpus_audio import CorpusError, read_manifest


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def time_first_audio(session: ReplySession, audio: np.ndarray, chunk: int, reply_frames: int) -> tuple[float, float]:
    """Seconds from end of utterance to the first reply frame, and the real-time factor of
    producing `reply_frames` frames (audio seconds per compute second)."""
    for start in range(0, len(audio), chunk):
        session.feed(audio[start: start + chunk])
    started = time.perf_counter()
    stream = session.end_of_utterance()
    produced = 0
    first = None
    try:
        for frame in stream:
            first = first if first is not None else time.perf_counter() - started
            produced += len(frame)
            if produced >= reply_frames * session.hop:
                break
    finally:
        stream.close()
    if first is None:
        raise RuntimeError("the model ended the reply before its first frame")
    elapsed = time.perf_counter() - started
    return first, produced / session.bundle.sample_rate / max(elapsed, 1e-9)


def measure_latency(bundle: ModelBundle, params: Params, utterances: list[tuple[np.ndarray, str, str]] | None = None,
                    ) -> dict[str, float]:
    """First-audio latency (ms: mean, p50, p95, std, min, max) over the configured utterances,
    after a few warm-up turns; one torch thread by default, as one serving worker has."""
    cfg = params.latency
    utterances = utterances or user_turns(params, cfg.utterances + cfg.warmup)
    settings = GenerationSettings.from_params(params.serving)
    chunk = int(bundle.sample_rate * cfg.chunk_ms / 1000)
    firsts, rtfs = [], []
    with torch_threads(cfg.threads):
        session = ReplySession(bundle, settings=settings, seed=0)
        for i, (audio, speaker, emotion) in enumerate(tqdm(utterances, desc="latency", unit="turn")):
            session.set_voice(speaker, emotion)
            audio = audio[: int(settings.max_utterance_seconds * bundle.sample_rate)]
            first, rtf = time_first_audio(session, audio, chunk, cfg.reply_frames)
            if i >= cfg.warmup:
                firsts.append(first * 1000)
                rtfs.append(rtf)
    values = np.array(firsts)
    return {"first_audio_mean_ms": float(values.mean()), "first_audio_p50_ms": float(np.percentile(values, 50)),
            "first_audio_p95_ms": float(np.percentile(values, 95)), "first_audio_std_ms": float(values.std()),
            "first_audio_min_ms": float(values.min()), "first_audio_max_ms": float(values.max()),
            "reply_realtime_factor": float(np.median(rtfs)), "turns": float(len(values))}


def write_latency(path: Path, figures: dict[str, float]) -> None:
    from tasks import atomic

    atomic.write_json(path, figures)
