"""sources.yaml: what the data flow downloads, with licence and optional speaker/emotion metadata.

Each source is a URL yt-dlp understands (a channel, playlist, video, direct media, or file://),
a licence note, and optionally the checklist speakers in order of first appearance and the
emotion (style) of the recording. Both are used to name diarized speakers and to label pairs.
A source may also name a timed transcript, which gives segments their text (tasks/data/transcripts.py).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.labels import EMOTIONS, SPEAKERS


class SourcesError(ValueError):
    """A sources file that cannot be used; the message names the file and the problem."""


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=80)
    url: str
    licence: str
    speakers: tuple[str, ...] | None = None
    emotion: str | None = None
    transcript: str | None = None  # timed text of the recording (tasks/data/transcripts.py)

    @field_validator("speakers")
    @classmethod
    def _known_speakers(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in value or ():
            if name not in SPEAKERS:
                raise ValueError(f"unknown speaker {name!r}, expected one of {', '.join(SPEAKERS)}")
        return value

    @field_validator("emotion")
    @classmethod
    def _known_emotion(cls, value: str | None) -> str | None:
        if value is not None and value not in EMOTIONS:
            raise ValueError(f"unknown emotion {value!r}, expected one of {', '.join(EMOTIONS)}")
        return value


def load_sources(path: Path) -> list[Source]:
    """Parse and validate a sources file: missing file, empty list and duplicate ids are errors."""
    path = Path(path)
    if not path.is_file():
        raise SourcesError(f"sources file {path} does not exist (run `s2s corpus synth` for the embedded corpus)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SourcesError(f"sources file {path} is not valid YAML: {exc}") from exc
    entries = raw.get("sources") if isinstance(raw, dict) else None
    if not entries:
        raise SourcesError(f"sources file {path} lists no sources (expected a non-empty `sources:` list)")
    sources: list[Source] = []
    for index, entry in enumerate(entries):
        try:
            sources.append(Source(**entry))
        except (ValidationError, TypeError) as exc:
            raise SourcesError(f"{path}: source #{index + 1} is invalid: {exc}") from exc
    ids = [s.id for s in sources]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise SourcesError(f"{path}: duplicate source ids: {', '.join(duplicates)}")
    return sources
