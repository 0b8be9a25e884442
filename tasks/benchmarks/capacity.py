"""Capacity: the largest session count a server holds within the issue's goals, found by a short
search over session counts, printed as sessions per core (the figure the cost per user-hour is
computed from).

A count passes when every planned turn completed with no error and no dropped session, first
audio p95 < GOAL_P95_MS, and no reply had a playback gap. The search starts from the counts the
load test already measured (the largest passing one below the smallest failing one), doubles
until a count fails, then bisects; it stops after `probes` runs or when the bracket is within
10 % (the figure is an estimate on a shared machine, not a bound to the session).

The latency gate and the sign-off report quote the last recorded figure (`recorded_capacity`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

GOAL_P95_MS = 300.0
RULE = (f"p95 first audio < {GOAL_P95_MS:g} ms, no reply with a playback gap, 0 errors, 0 dropped, every turn "
        "completed")


def passes(run: dict[str, Any]) -> tuple[bool, str]:
    """Whether a run (LoadResult.summary()) meets the capacity rule, and why not."""
    p95 = run["latency_ms"]["p95"]
    playback = run.get("playback") or {}
    problems = []
    if run["errors"] or run["dropped"]:
        problems.append(f"{run['errors']} errors, {run['dropped']} dropped")
    if run.get("turns_planned") is not None and run["turns_completed"] < run["turns_planned"]:
        problems.append(f"{run['turns_completed']}/{run['turns_planned']} turns")
    if p95 is None or p95 >= GOAL_P95_MS:
        problems.append("no completed turn" if p95 is None else f"p95 {p95:.0f} ms")
    if playback.get("with_gap"):
        problems.append(f"{playback['with_gap']} replies with a gap")
    return not problems, "; ".join(problems)


def next_probe(good: int, bad: int | None, ceiling: int) -> int | None:
    """The next session count to try, or None when the search is done."""
    if bad is None:
        return None if good >= ceiling else min(max(2 * good, 1), ceiling)
    if bad - good <= max(1, good // 10):
        return None
    return (good + bad) // 2


async def search_capacity(measure: Callable[[int], Awaitable[dict[str, Any]]], known: list[dict[str, Any]],
                          probes: int, ceiling: int, cores: int | None = None) -> dict[str, Any]:
    """Search with up to `probes` runs of `measure(count)`, starting from the `known` runs;
    returns {sessions, sessions_per_core, cores, failed_at, probes: [...], rule}."""
    good, bad = 0, None
    verdicts = sorted((r["clients"], passes(r)[0]) for r in known)
    for count, ok in verdicts:
        if not ok:
            bad = count if bad is None else min(bad, count)
    good = max([count for count, ok in verdicts if ok and (bad is None or count < bad)], default=0)
    trials = []
    for _ in range(probes):
        count = next_probe(good, bad, ceiling)
        if count is None:
            break
        run = await measure(count)
        ok, why = passes(run)
        trials.append({"sessions": count, "passed": ok, "why": why, "p95_ms": run["latency_ms"]["p95"],
                       "with_gap": (run.get("playback") or {}).get("with_gap")})
        if ok:
            good = max(good, count)
        else:
            bad = count if bad is None else min(bad, count)
    cores = cores or os.cpu_count() or 1
    return {"sessions": good, "sessions_per_core": good / cores, "cores": cores, "failed_at": bad,
            "ceiling": ceiling, "probes": trials, "rule": RULE}


def recorded_capacity(report_path: Path) -> dict[str, float] | None:
    """The capacity the last `s2s loadtest` found (its JSON report, artifacts/loadtest.json), as
    figures the latency gate quotes: capacity_sessions, capacity_sessions_per_core, capacity_cores;
    None when no search was recorded."""
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError):
        return None
    capacity = report.get("capacity") if isinstance(report, dict) else None
    if not isinstance(capacity, dict) or "sessions" not in capacity:
        return None
    return {"capacity_sessions": float(capacity["sessions"]),
            "capacity_sessions_per_core": float(capacity["sessions_per_core"]),
            "capacity_cores": float(capacity["cores"])}
