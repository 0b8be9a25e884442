"""Write the versioned corpus folder (data/): segments, quarantine, manifest, splits, pairs, reports.

The folder is built under a temporary name and swapped in whole (core.atomic.atomic_dir), so a
crash never leaves a half-written corpus for DVC to pick up, and no file of an earlier corpus
lingers. A fingerprint of everything the corpus is made from is stored in its summary: when it
is unchanged, the folder is left alone and `dvc add` has nothing to do.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

from core import atomic

MANIFEST_COLUMNS = ["segment_id", "path", "split", "source_id", "recording_id", "start", "end",
                    "speaker", "speaker_label", "emotion", "duration_s", "dbfs", "raw_dbfs", "snr_db",
                    "clipping_ratio", "silence_ratio", "text"]


@dataclass
class CorpusSummary:
    """What `make pipeline` prints at the end of the data flow, and later runs record."""

    hours_in: float
    recordings: int
    sources_failed: dict[str, dict[str, str]]
    segments_kept: int
    segments_quarantined: int
    quarantine_reasons: dict[str, int]
    kept_hours: float
    speakers: dict[str, int]
    emotions: dict[str, int]
    pairs: int
    splits: dict[str, int]
    fingerprint: str
    corpus_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def existing_summary(data_dir: Path, expected: str) -> CorpusSummary | None:
    """The summary of the corpus on disk when it was built from exactly these inputs."""
    path = data_dir / "reports" / "summary.json"
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("fingerprint") != expected or not (data_dir / "manifest.csv").is_file():
        return None
    return CorpusSummary(**stored)


def _write_clips(rows: pd.DataFrame, folder: str, staging: Path, wav_paths: dict[str, str]) -> list[str]:
    paths: list[str] = []
    audio_cache: dict[str, tuple[np.ndarray, int]] = {}
    for row in tqdm(rows.itertuples(index=False), total=len(rows), desc=f"write {folder}", unit="seg"):
        if row.recording_id not in audio_cache:
            audio_cache.clear()  # rows are sorted by recording: keep one recording in memory
            audio_cache[row.recording_id] = sf.read(wav_paths[row.recording_id], dtype="float32")
        audio, rate = audio_cache[row.recording_id]
        relative = f"{folder}/{row.recording_id}/{row.segment_id}.wav"
        clip = audio[int(row.start * rate): int(row.end * rate)]
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(target, clip, rate, subtype="PCM_16")
        paths.append(relative)
    return paths


def build_corpus(data_dir: Path, kept: pd.DataFrame, quarantined: pd.DataFrame, failures: dict[str, dict[str, str]],
                 splits: dict[str, list[str]], pairs: list[dict], validation: dict, wav_paths: dict[str, str],
                 hours_in: float, recordings: int, input_fingerprint: str) -> CorpusSummary:
    kept = kept.sort_values(["recording_id", "start"]).reset_index(drop=True)
    quarantined = quarantined.sort_values(["recording_id", "start"]).reset_index(drop=True)
    reasons = Counter(quarantined["reason_code"]) if len(quarantined) else Counter()
    for failure in failures.values():
        reasons[f"recording_{failure['code']}"] += 1
    summary = CorpusSummary(
        hours_in=round(hours_in, 4),
        recordings=recordings,
        sources_failed=failures,
        segments_kept=len(kept),
        segments_quarantined=len(quarantined),
        quarantine_reasons=dict(sorted(reasons.items())),
        kept_hours=round(float(kept["duration_s"].sum()) / 3600, 4) if len(kept) else 0.0,
        speakers=dict(sorted(Counter(kept["speaker"]).items())) if len(kept) else {},
        emotions=dict(sorted(Counter(kept["emotion"]).items())) if len(kept) else {},
        pairs=len(pairs),
        splits={name: int((kept["split"] == name).sum()) for name in ("train", "val", "test")} if len(kept) else {},
        fingerprint=input_fingerprint,
    )
    with atomic.atomic_dir(data_dir) as staging:
        kept = kept.assign(path=_write_clips(kept, "segments", staging, wav_paths))
        quarantined = quarantined.assign(path=_write_clips(quarantined, "quarantine", staging, wav_paths))
        kept[MANIFEST_COLUMNS].to_csv(staging / "manifest.csv", index=False)
        source_rows = pd.DataFrame([{"segment_id": "", "recording_id": rid, "source_id": f["source_id"],
                                     "reason": f["error"], "reason_code": f"recording_{f['code']}"}
                                    for rid, f in failures.items()])
        pd.concat([quarantined[MANIFEST_COLUMNS + ["reason", "reason_code"]], source_rows], ignore_index=True) \
            .to_csv(staging / "quarantine.csv", index=False)
        (staging / "splits.json").write_text(json.dumps(splits, indent=2) + "\n")
        (staging / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        reports = staging / "reports"
        reports.mkdir()
        (reports / "validation.json").write_text(json.dumps(stable_report(validation), indent=1, default=str) + "\n")
        (reports / "summary.json").write_text(json.dumps(asdict(summary), indent=2, default=str) + "\n")
        (reports / "summary.md").write_text(summary_markdown(summary) + "\n")
    return summary


# What Great Expectations stamps on every validation: random ids and clock times. Kept, they made
# the corpus hash of an unchanged corpus differ at every rebuild (data.dvc dirty after each run).
VOLATILE_REPORT_KEYS = frozenset({"id", "validation_id", "ge_load_time", "run_time", "validation_time"})


def stable_report(value: Any) -> Any:
    """The validation report without its volatile fields: the same data gives the same bytes."""
    if isinstance(value, dict):
        return {k: stable_report(v) for k, v in value.items() if k not in VOLATILE_REPORT_KEYS}
    if isinstance(value, list):
        return [stable_report(v) for v in value]
    return value


def summary_markdown(summary: CorpusSummary) -> str:
    lines = [
        "# Corpus summary",
        "",
        f"- hours in: {summary.hours_in:.3f} h from {summary.recordings} recordings",
        f"- segments kept: {summary.segments_kept} ({summary.kept_hours:.3f} h)",
        f"- segments quarantined: {summary.segments_quarantined}",
        f"- pairs: {summary.pairs}",
        f"- corpus hash: {summary.corpus_hash or '(not versioned)'}",
        "",
        "| quarantine reason | count |", "|---|---|",
        *[f"| {reason} | {count} |" for reason, count in summary.quarantine_reasons.items()],
        "",
        "| speaker | kept segments |", "|---|---|",
        *[f"| {name} | {count} |" for name, count in summary.speakers.items()],
    ]
    if summary.sources_failed:
        lines += ["", "| failed source | error |", "|---|---|",
                  *[f"| {rid} | {f['error']} |" for rid, f in summary.sources_failed.items()]]
    return "\n".join(lines)
