"""Atomic writes: a reader (or a crash) never sees half a file or half a folder.

Every output of the pipeline goes through these helpers: the content is written beside the
target under a temporary name and renamed over it, which POSIX makes atomic on one filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf


@contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: Path, payload: Any) -> Path:
    return write_text(target, json.dumps(payload, ensure_ascii=False, indent=2, default=str) + "\n")


def write_jsonl(target: Path, rows: list[dict[str, Any]]) -> Path:
    return write_text(target, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def write_wav(target: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM WAV, the corpus's one audio format."""
    with atomic_path(target, suffix=".wav") as tmp:
        sf.write(tmp, np.asarray(audio, dtype=np.float32), sample_rate, subtype="PCM_16", format="WAV")
    return Path(target)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a folder under a temporary name, then swap it in place of `target` at the end.

    The old folder is moved aside before the new one is renamed in, and removed after; if the
    block fails, the temporary folder is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.build.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
