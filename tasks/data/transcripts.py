"""Ground-truth text for segments, from a source's timed transcript.

Why: the quality evaluators (a Telugu CTC recognizer and the CER of generated replies) need to
know what each segment says. A source may name a transcript (`transcript:` in sources.yaml, a
file:// URL or a path relative to the sources file): JSON with `turns`, each a `start`, `end`
(seconds on the recording's timeline) and `text`. The embedded corpus writes one per episode.

A segment gets the text of the turns it holds: every turn that lies mostly (80 % of it or more) inside
the segment, in time order. A segment that holds only part of some turn (a turn split by the
segmenter, or cut by a broken download) gets no text: a wrong reference would be worse than none.
Segments of sources without a transcript have no text either; they still train the codec and S2S.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

from tasks.data.sources import Source, SourcesError

MOSTLY_INSIDE = 0.8   # a turn belongs to a segment when at least this share of it lies inside
PARTLY_INSIDE = 0.15  # ... and is cut off when a share between the two lies inside


def transcript_path(source: Source, sources_file: Path) -> Path | None:
    """Where a source's transcript lives on disk, or None when it names none."""
    if not source.transcript:
        return None
    parsed = urlparse(source.transcript)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme:
        raise SourcesError(f"source {source.id}: transcript must be a file:// URL or a path, "
                           f"got {source.transcript!r}")
    path = Path(source.transcript).expanduser()
    return path if path.is_absolute() else (Path(sources_file).parent / path)


def load_turns(path: Path, source_id: str) -> list[dict]:
    """The timed turns of one transcript; a clear error when the file is missing or malformed."""
    if not path.is_file():
        raise SourcesError(f"source {source_id}: transcript {path} does not exist")
    try:
        turns = json.loads(path.read_text(encoding="utf-8"))["turns"]
        return sorted(({"start": float(t["start"]), "end": float(t["end"]), "text": str(t["text"]).strip()}
                       for t in turns), key=lambda t: t["start"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SourcesError(f"source {source_id}: transcript {path} is not JSON with turns of "
                           f"start, end and text: {exc}") from exc


def segment_text(start: float, end: float, turns: list[dict]) -> str:
    """The text a segment [start, end] holds, or "" when it cuts a turn (see the module doc)."""
    held: list[str] = []
    for turn in turns:
        length = max(turn["end"] - turn["start"], 1e-6)
        inside = max(0.0, min(end, turn["end"]) - max(start, turn["start"])) / length
        if inside >= MOSTLY_INSIDE:
            held.append(turn["text"])
        elif inside > PARTLY_INSIDE:
            return ""
    return " ".join(t for t in held if t)


def attach_text(rows: list[dict], sources: list[Source], sources_file: Path) -> list[dict]:
    """Segment rows with a `text` column ("" where unknown), from each source's transcript.

    A transcript describes one recording's timeline, so it applies to a source that yielded
    exactly one recording; for a playlist source it is ignored (text stays unknown).
    """
    by_id = {s.id: s for s in sources}
    recordings: dict[str, set[str]] = {}
    for row in rows:
        recordings.setdefault(row["source_id"], set()).add(row["recording_id"])
    turns_of: dict[str, list[dict]] = {}
    for source_id, recs in recordings.items():
        path = transcript_path(by_id[source_id], sources_file) if source_id in by_id else None
        if path is not None and len(recs) == 1:
            turns_of[source_id] = load_turns(path, source_id)
    return [{**row, "text": segment_text(row["start"], row["end"], turns_of[row["source_id"]])
             if row["source_id"] in turns_of else ""} for row in rows]
