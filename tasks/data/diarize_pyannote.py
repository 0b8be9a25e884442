"""Optional pyannote.audio speaker-diarization backend for the segmentation step.

Silero VAD plus our own clustering is the default; this backend lets a run use a pyannote
diarization pipeline instead (`segment.backend: pyannote`). pyannote.audio is imported only here,
so runs that never select it never pay for it. The pipeline is either a local one (a folder
holding a pipeline `config.yaml`, or the file itself, with the checkpoints it names on disk),
which needs no network, or a Hugging Face hub id, which needs HF_TOKEN because pyannote's
pipelines are gated. Audio is handed over in memory, so nothing is re-read from disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

SAMPLE_RATE = 16000
CONFIG_NAME = "config.yaml"
# owner/name, as the hub spells repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Turns = list[tuple[float, float, str]]


def _resolve(spec: str) -> tuple[str, str | None]:
    """(what to hand to Pipeline.from_pretrained, token or None for a local pipeline)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / CONFIG_NAME
        if not config.is_file():
            raise FileNotFoundError(f"pyannote pipeline folder {path} holds no {CONFIG_NAME}")
        return str(config), None
    if path.is_file():
        return str(path), None
    if _HUB_ID.match(spec) and not spec.endswith((".yaml", ".yml")):
        token = os.environ.get("HF_TOKEN")
        if not token:
            raise ValueError(
                f"segment.pyannote_pipeline {spec!r} is not a local path, so it is taken as a "
                "Hugging Face hub id, and loading it needs HF_TOKEN set in the environment "
                "(accept the model's conditions on hf.co first); or point it at a local pipeline"
            )
        return spec, token
    raise FileNotFoundError(f"pyannote pipeline not found: {spec} (no such file or folder)")


def _turns(output: Any) -> Turns:
    """Speaker turns from a DiarizeOutput (pyannote 4) or a plain Annotation (legacy pipelines).

    From a DiarizeOutput we take the exclusive diarization (no overlapping turns), since every
    turn becomes a single-speaker segment downstream.
    """
    annotation = getattr(output, "exclusive_speaker_diarization", None)
    if annotation is None:
        annotation = getattr(output, "speaker_diarization", output)
    turns = [(float(seg.start), float(seg.end), str(label))
             for seg, _, label in annotation.itertracks(yield_label=True)]
    return sorted(turns)


def load_diarizer(spec: str | None) -> Callable[[np.ndarray], Turns]:
    """Load a pyannote pipeline and return a function from 16 kHz mono float32 audio to
    speaker turns [(start_s, end_s, label), ...] sorted by start.

    `spec` is a local path (pipeline folder or its config.yaml) or a hub id (needs HF_TOKEN).
    """
    if not spec:
        raise ValueError("segment.backend is pyannote, so segment.pyannote_pipeline must be set "
                         "(a local pipeline folder or config.yaml, or a hub id with HF_TOKEN)")
    source, token = _resolve(str(spec))

    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")  # pyannote 4 phones home otherwise
    import torch
    from pyannote.audio import Pipeline

    try:
        pipeline = Pipeline.from_pretrained(source, token=token)
    except Exception as exc:  # the message names the pipeline, never the token
        raise RuntimeError(f"could not load pyannote pipeline {source}: {type(exc).__name__}: {exc}") from exc
    if pipeline is None:
        raise RuntimeError(f"could not load pyannote pipeline {source}")
    if torch.cuda.is_available():
        pipeline.to(torch.device("cuda"))

    def diarize(audio: np.ndarray) -> Turns:
        samples = np.asarray(audio, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono audio (1-D), got shape {samples.shape}")
        waveform = torch.from_numpy(np.ascontiguousarray(samples)).unsqueeze(0)
        turns = _turns(pipeline({"waveform": waveform, "sample_rate": SAMPLE_RATE}))
        # pyannote's frames can run a few ms past either end of the audio: clip to it
        duration = len(samples) / SAMPLE_RATE
        clipped = [(max(start, 0.0), min(end, duration), label) for start, end, label in turns]
        return [turn for turn in clipped if turn[1] > turn[0]]

    return diarize
