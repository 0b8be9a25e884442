"""Quality against training time: figures measured at chosen steps of one run, for the curve.

A profile's budget is picked from where quality stops paying for time, so a training run can
stop at `curve_steps` to score itself (the codec on the test split and the unseen voices, the S2S
model on the validation split) and keep a snapshot of its weights for later scoring. The points
go to MLflow and to curve.jsonl beside the checkpoint; time spent scoring is not training time.
A run that starts at step 0 clears the points and snapshots of the run before it (reset_curve), so
curve.jsonl holds one run; a resumed run keeps them and goes on adding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from core import atomic


def record_point(out_dir: Path, step: int, train_seconds: float, metrics: dict[str, float]) -> dict[str, Any]:
    """Store one point (replacing an earlier one at the same step: a resumed run may pass it
    again) and return it."""
    point = {"step": step, "train_minutes": round(train_seconds / 60.0, 3),
             **{k: round(float(v), 4) for k, v in metrics.items()}}
    points = {p["step"]: p for p in read_curve(out_dir)} | {step: point}
    atomic.write_text(out_dir / "curve.jsonl", "".join(json.dumps(points[s]) + "\n" for s in sorted(points)))
    return point


def read_curve(out_dir: Path) -> list[dict[str, Any]]:
    """The points of the last run in `out_dir`, by step (empty when it recorded none)."""
    path = Path(out_dir) / "curve.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def snapshot_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "snapshots" / f"step{step:06d}.pt"


def reset_curve(out_dir: Path) -> None:
    """Forget the points and snapshots of an earlier run in `out_dir` (a run starting at step 0)."""
    (Path(out_dir) / "curve.jsonl").unlink(missing_ok=True)
    shutil.rmtree(Path(out_dir) / "snapshots", ignore_errors=True)
