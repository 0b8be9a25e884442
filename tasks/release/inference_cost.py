"""What serving costs, from the capacity the load test measured and the core-hour price in
params.yaml (`inference_cost`): servers needed for the stated load, cost per hour, day and month,
and per user-hour. Capacity is the largest session count whose p95 first audio met the target
with no errors; it comes from the latest `s2s loadtest` result (artifacts/loadtest.json) when
there is one, else from the last measured figures params.yaml keeps with their source.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from core.config import Params


@dataclass
class Capacity:
    sessions: int                  # the largest measured count that fit the target (0: none did)
    cores: int                     # of the machine it was measured on
    source: str
    first_audio_ms: dict[int, dict[str, float]] = field(default_factory=dict)  # sessions -> p50/p95

    @property
    def sessions_per_core(self) -> float:
        return self.sessions / self.cores if self.cores else 0.0


def capacity_from_report(report: dict[str, Any], target_p95_ms: float, source: str) -> Capacity:
    """Capacity from an `s2s loadtest` JSON report: runs with batching on (or a running server's)."""
    if not isinstance(report.get("runs"), list) or not all(
            isinstance(r, dict) and isinstance(r.get("clients"), int) and isinstance(r.get("latency_ms"), dict)
            for r in report["runs"]):
        raise ValueError("'runs' must list runs with an integer 'clients' and their 'latency_ms'")
    runs = [r for r in report["runs"] if r.get("batching") is not False]
    fits = [r["clients"] for r in runs
            if not r.get("errors") and not r.get("dropped") and (r.get("latency_ms") or {}).get("p95") is not None
            and r["latency_ms"]["p95"] < target_p95_ms]
    meta = report.get("meta", {})
    cores = int((meta.get("machine") or {}).get("cores") or 0)
    first = {r["clients"]: {k: float(r["latency_ms"][k]) for k in ("p50", "p95") if r["latency_ms"].get(k) is not None}
             for r in runs}
    when = meta.get("started", "date unknown")
    searched = report.get("capacity")
    if isinstance(searched, dict) and isinstance(searched.get("sessions"), (int, float)) and searched.get("cores"):
        # The load test's own capacity search: p95 under target and no playback gap (its stricter rule).
        return Capacity(int(searched["sessions"]), int(searched["cores"]),
                        f"{source} (s2s loadtest capacity search of {when}: p95 first audio and playback gaps)", first)
    return Capacity(max(fits, default=0), cores, f"{source} (s2s loadtest of {when}, {cores} cores, batching on)",
                    first)


def measured_capacity(params: Params) -> Capacity:
    """The latest load test's capacity, else the fallback figures of params.yaml (with their source)."""
    config = params.inference_cost
    path = params.path(config.loadtest_json)
    if path.is_file():
        try:
            return capacity_from_report(json.loads(path.read_text()), config.target_p95_ms, str(config.loadtest_json))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not an `s2s loadtest` report ({exc}): run `s2s loadtest` again "
                             "or remove it to use inference_cost.fallback") from exc
    fallback = config.fallback
    return Capacity(fallback.sessions, fallback.cores, f"params.yaml inference_cost.fallback: {fallback.source}",
                    {int(k): dict(v) for k, v in fallback.first_audio_ms.items()})


def inference_cost(params: Params, capacity: Capacity) -> dict[str, Any] | None:
    """Servers, cores and USD per hour/day/month at the stated load, and per user-hour; None when
    no measured session count met the target (then nothing can be costed honestly)."""
    config = params.inference_cost
    if capacity.sessions <= 0 or capacity.cores <= 0:
        return None
    servers = math.ceil(config.load_sessions / capacity.sessions)
    cores = servers * capacity.cores
    hourly = cores * config.core_hour_usd
    return {"load_sessions": config.load_sessions, "sessions_per_server": capacity.sessions,
            "cores_per_server": capacity.cores, "sessions_per_core": capacity.sessions_per_core,
            "servers": servers, "cores": cores, "core_hour_usd": config.core_hour_usd,
            "usd_per_hour": hourly, "usd_per_day": hourly * 24, "usd_per_month": hourly * config.hours_per_month,
            "usd_per_user_hour": hourly / config.load_sessions,
            "usd_per_user_hour_full": config.core_hour_usd / capacity.sessions_per_core}


def cost_section(params: Params, capacity: Capacity, training: dict[str, float] | None) -> list[str]:
    """The sign-off report's inference cost, beside the training cost of the version."""
    config = params.inference_cost
    cost = inference_cost(params, capacity)
    lines = ["", "## Inference cost", "",
             f"Capacity: {capacity.sessions} concurrent sessions on {capacity.cores} cores "
             f"({capacity.sessions_per_core:.2f} sessions per core) with p95 first audio < "
             f"{config.target_p95_ms:g} ms and no errors. Source: {capacity.source}. Price: "
             f"${config.core_hour_usd:g} per core-hour (params.yaml inference_cost.core_hour_usd).", ""]
    if cost is None:
        return lines + ["Not computed: no measured session count met the target, so no capacity to cost."]
    lines += ["| figure | value |", "|---|---|",
              f"| stated load | {cost['load_sessions']} concurrent conversations, around the clock |",
              f"| servers ({cost['cores_per_server']} cores, {cost['sessions_per_server']} sessions each) | "
              f"{cost['servers']} ({cost['cores']} cores) |",
              f"| per hour | ${cost['usd_per_hour']:.2f} |", f"| per day | ${cost['usd_per_day']:.2f} |",
              f"| per month ({config.hours_per_month:g} h) | ${cost['usd_per_month']:.2f} |",
              f"| per user-hour at this load | ${cost['usd_per_user_hour']:.4f} |",
              f"| per user-hour, servers fully used | ${cost['usd_per_user_hour_full']:.4f} |"]
    if training:
        total = training.get("total_usd")
        lines += [f"| training (this version, once) | "
                  f"{'not measured' if total is None else f'${total:.2f}'} |"]
    return lines
