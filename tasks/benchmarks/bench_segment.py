"""`s2s bench segment`: segmentation measured against the embedded corpus's ground truth.

Accuracy: boundary error (each true turn start/end to the nearest predicted boundary of the same
kind), turn recall (true turns whose midpoint lies in a predicted segment), speaker purity
(share of each predicted segment's speech that belongs to its majority true speaker) and naming
accuracy (predicted checklist speaker equals the true one, over speech time).
Throughput: audio seconds per wall second (x real time) of VAD + speaker labelling + quality
metrics on this machine, median over repeats, beside silero's own one-stream VAD as a baseline
measured in the same process (the ratio is what to compare across machines).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from rich.console import Console
from rich.table import Table

from core.config import Params
from tasks.data.segment import segment_audio
from tasks.data.sources import load_sources


def _truth_and_audio(params: Params) -> list[tuple[dict, Path, Path]]:
    """(truth, normalized wav, levels) for every good embedded episode the data flow processed."""
    corpus_dir = params.path(params.corpus.out_dir)
    norm_dir = params.path(params.normalize.out_dir)
    found = []
    for truth_path in sorted((corpus_dir / "truth").glob("*.json")):
        truth = json.loads(truth_path.read_text())
        if truth.get("defect"):
            continue
        wavs = sorted((norm_dir / truth["id"]).glob("*.wav"))
        if wavs:
            found.append((truth, wavs[0], wavs[0].with_suffix(".levels.npz")))
    return found


def score(truth_turns: list[dict], predicted: list[dict]) -> dict[str, float]:
    starts = np.array([p["start"] for p in predicted])
    ends = np.array([p["end"] for p in predicted])
    errors = []
    for turn in truth_turns:
        if len(starts):
            errors.append(float(np.min(np.abs(starts - turn["start"]))))
            errors.append(float(np.min(np.abs(ends - turn["end"]))))
    mids = [(t["start"] + t["end"]) / 2 for t in truth_turns]
    found = sum(any(p["start"] <= m <= p["end"] for p in predicted) for m in mids)
    pure, named, total = 0.0, 0.0, 0.0
    for p in predicted:
        overlap: dict[str, float] = {}
        for t in truth_turns:
            o = min(p["end"], t["end"]) - max(p["start"], t["start"])
            if o > 0:
                overlap[t["speaker"]] = overlap.get(t["speaker"], 0.0) + o
        if not overlap:
            continue
        speech = sum(overlap.values())
        pure += max(overlap.values())
        named += overlap.get(p["speaker"], 0.0)
        total += speech
    return {
        "boundary_errors_s": errors,
        "turns": len(truth_turns),
        "turns_found": found,
        "pure_s": pure,
        "named_s": named,
        "speech_s": total,
    }


def run_benchmark(params: Params) -> dict:
    from silero_vad import get_speech_timestamps, load_silero_vad

    from tasks.data.sources import Source

    episodes = _truth_and_audio(params)
    if not episodes:
        raise SystemExit("no processed embedded episodes found: run `s2s flow data` first")
    sources = {s.id: s for s in load_sources(params.path(params.paths.sources_file))}
    audio_s = 0.0
    totals = {"boundary_errors_s": [], "turns": 0, "turns_found": 0, "pure_s": 0.0, "named_s": 0.0, "speech_s": 0.0}
    loaded = []
    for truth, wav, levels_path in episodes:
        audio, _ = sf.read(wav, dtype="float32")
        with np.load(levels_path) as h:
            levels = {k: h[k] for k in h.files}
        loaded.append((truth, audio, levels, sources.get(truth["id"]) or Source(id=truth["id"], url="", licence="")))
        audio_s += len(audio) / 16000

    def segment_everything() -> list[list[dict]]:
        return [segment_audio(audio, levels, source, truth["id"], params.segment)
                for truth, audio, levels, source in loaded]

    def baseline_vad() -> None:
        model = load_silero_vad()
        for _, audio, _, _ in loaded:
            get_speech_timestamps(torch.from_numpy(audio), model, min_silence_duration_ms=params.segment.min_silence_ms)

    segment_everything()  # warm-up: model load, MFCC kernels
    times, results = [], None
    for _ in range(params.bench.segment_repeats):
        t0 = time.perf_counter()
        results = segment_everything()
        times.append(time.perf_counter() - t0)
    base_times = []
    for _ in range(max(1, params.bench.segment_repeats // 2 + 1)):
        t0 = time.perf_counter()
        baseline_vad()
        base_times.append(time.perf_counter() - t0)

    for (truth, *_), predicted in zip(loaded, results or []):
        s = score(truth["turns"], predicted)
        for key in totals:
            totals[key] = totals[key] + s[key]
    errors = np.array(totals["boundary_errors_s"])
    pipeline_x = audio_s / statistics.median(times)
    baseline_x = audio_s / statistics.median(base_times)
    return {
        "episodes": len(loaded),
        "audio_minutes": round(audio_s / 60, 2),
        "torch_threads": torch.get_num_threads(),
        "boundary_error_median_ms": round(float(np.median(errors)) * 1000, 1),
        "boundary_error_p90_ms": round(float(np.percentile(errors, 90)) * 1000, 1),
        "boundaries_within_200ms": round(float(np.mean(errors <= 0.2)), 4),
        "turn_recall": round(totals["turns_found"] / max(totals["turns"], 1), 4),
        "speaker_purity": round(totals["pure_s"] / max(totals["speech_s"], 1e-9), 4),
        "speaker_naming_accuracy": round(totals["named_s"] / max(totals["speech_s"], 1e-9), 4),
        "segments": sum(len(r) for r in results or []),
        "pipeline_x_realtime_median": round(pipeline_x, 1),
        "pipeline_runs_s": [round(t, 3) for t in times],
        "baseline_silero_one_stream_x_realtime_median": round(baseline_x, 1),
        "speedup_vs_baseline_vad": round(pipeline_x / baseline_x, 2),
    }


def print_report(report: dict, console: Console) -> None:
    table = Table(title="s2s bench segment (VAD + speakers + quality metrics vs ground truth)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in report.items():
        table.add_row(key, str(value))
    console.print(table)
