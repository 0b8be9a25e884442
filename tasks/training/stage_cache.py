"""Stage stamps: a finished stage whose inputs, settings and code are unchanged is skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core import atomic


def cached_result(out_dir: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """The stored result of a finished stage whose stamp equals `stamp`, else None.

    This is what lets a re-run of the train flow (or the CLI, or dvc repro) skip a stage whose
    corpus, settings and code are unchanged: result.json is written last, beside a stamp.json
    of exactly those inputs, and the checkpoint it names must still exist.
    """
    stamp_path, result_path = out_dir / "stamp.json", out_dir / "result.json"
    if not (stamp_path.is_file() and result_path.is_file()):
        return None
    if json.loads(stamp_path.read_text()) != json.loads(json.dumps(stamp, default=str)):
        return None
    result = json.loads(result_path.read_text())
    return result if Path(result["checkpoint"]).is_file() and result.get("metrics") else None


def write_stamp(out_dir: Path, stamp: dict[str, Any]) -> None:
    atomic.write_text(out_dir / "stamp.json", json.dumps(stamp, indent=2, sort_keys=True, default=str) + "\n")
