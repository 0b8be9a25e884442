"""Bookkeeping of the engine's ticks: which reply rows step (deadline scheduling) and where a
tick's time goes (the profile that `s2s bench engine` and /stats report).

Kept apart from serving.engine so the rules are plain functions a test can check row by row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

MERGE_GAP = 4  # waiting rows between two due runs that are stepped anyway: one batch beats two


def due_slices(due: list[bool], batching: bool = True, merge_gap: int = MERGE_GAP) -> list[slice]:
    """Contiguous row slices covering every due row. Runs of due rows separated by at most
    `merge_gap` waiting rows are joined (stepping a waiting row early only adds to its client's
    buffer, and one batch costs less than two); without batching, one slice per due row."""
    rows = [i for i, d in enumerate(due) if d]
    if not batching:
        return [slice(i, i + 1) for i in rows]
    slices: list[slice] = []
    for i in rows:
        if slices and i - slices[-1].stop <= merge_gap:
            slices[-1] = slice(slices[-1].start, i + 1)
        else:
            slices.append(slice(i, i + 1))
    return slices


@dataclass
class TickProfile:
    """Seconds spent per part of the engine's ticks (encode, step, decode; `other` is the rest of
    the tick: commands, scheduling, delivery), summed since the last reset. `clock` is wall time
    by default; a benchmark on a shared machine reads CPU time instead (time.process_time), which
    other processes' load does not inflate."""

    seconds: dict[str, float] = field(default_factory=lambda: {"encode": 0.0, "step": 0.0, "decode": 0.0})
    ticks: int = 0
    total_s: float = 0.0
    last_tick_s: float = 0.0
    clock: Callable[[], float] = time.perf_counter

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds

    def tick(self, seconds: float) -> None:
        self.ticks += 1
        self.total_s += seconds
        self.last_tick_s = seconds

    def reset(self) -> None:
        self.seconds = {k: 0.0 for k in self.seconds}
        self.ticks, self.total_s = 0, 0.0

    def per_tick_ms(self) -> dict[str, float]:
        """Mean milliseconds per tick of each part, `other` and `total`."""
        n = max(self.ticks, 1)
        parts = {k: v * 1000 / n for k, v in self.seconds.items()}
        total = self.total_s * 1000 / n
        return {**parts, "other": max(total - sum(parts.values()), 0.0), "total": total}
