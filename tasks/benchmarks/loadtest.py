"""`s2s loadtest`'s suite: utterances to speak, runs with batching on (and off) against started
servers or a running one, the conversational profile beside the back-to-back one, the capacity
search, a run with the engine's levers off (the same count, for the ratio), then a soak; the
report is load_report's. The command line itself is in s2s/ (the CLI), which calls run_suite.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from core.labels import EMOTIONS, SPEAKERS
from tasks.benchmarks.load_client import (SAMPLE_RATE, LoadTestError, _wait_idle, process_rss_mb, run_load,
                                          server_stats, soak)
from tasks.benchmarks.capacity import search_capacity
from tasks.benchmarks.load_report import (_mb, _ms, _now, _num, batching_ratio, evaluate_goals, levers_ratio,
                                          machine_info)
from tasks.benchmarks.playback import ThinkTime
from tasks.benchmarks.server_launcher import ServerProcess


def load_utterances(params: Any, count: int, max_seconds: float | None = None
                    ) -> tuple[list[np.ndarray], list[str], list[str], str]:
    """`count` user turns of the corpus's test split (audio at 16 kHz, the reply voice of each pair),
    or espeak-ng speech of the project's dialogue prompts when there is no corpus; truncated to
    max_seconds. Returns (audio, speakers, emotions, where they came from)."""
    try:
        from tasks.evaluation.latency import user_turns

        rate = params.normalize.sample_rate  # the rate of the corpus's segments
        if rate != SAMPLE_RATE:
            raise LoadTestError(f"the corpus segments are at {rate} Hz, the server takes {SAMPLE_RATE} Hz")
        turns = user_turns(params, count)
        source = f"user turns of the test split ({params.path(params.paths.data)})"
    except Exception:  # noqa: BLE001 - no corpus (missing files, empty split, other rate): speak instead
        turns, source = espeak_turns(count), "Telugu prompts spoken by espeak-ng (no corpus found)"
    limit = int(max_seconds * SAMPLE_RATE) if max_seconds else None
    audio = [np.asarray(a, dtype=np.float32)[:limit] for a, _, _ in turns]
    return audio, [s for _, s, _ in turns], [e for _, _, e in turns], source


def espeak_turns(count: int) -> list[tuple[np.ndarray, str, str]]:
    """Telugu prompts of tasks/data/telugu_dialogues.yaml spoken by espeak-ng, at 16 kHz."""
    from scipy.signal import resample_poly

    from tasks.data.synth_corpus import load_exchanges, render_turn

    prompts = [e.prompt for e in load_exchanges()][: max(count, 1)]
    rendered = []
    for i, text in enumerate(prompts):
        speaker = SPEAKERS[i % len(SPEAKERS)]
        audio = render_turn(text, speaker, "neutral", 22050)
        rendered.append((resample_poly(audio, 320, 441).astype(np.float32), SPEAKERS[(i + 1) % len(SPEAKERS)],
                         EMOTIONS[i % len(EMOTIONS)]))
    return [rendered[i % len(rendered)] for i in range(count)]


# --- the command -----------------------------------------------------------------------------------

# serving settings with every engine lever off: the baseline of the levers' ratio (docs/benchmarks.md)
LEVERS_OFF = ["serving.ahead_ms=0", "serving.encode_hops=1", "serving.precision=fp32"]


def _session_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise LoadTestError(f"--sessions {text!r}: comma-separated numbers, e.g. 1,10,50,100") from None
    if not counts or min(counts) < 1:
        raise LoadTestError(f"--sessions {text!r}: at least one count, each at least 1")
    return counts


def tick_profile(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """Mean ms per engine tick of each part (encode, step, decode, other) between two /stats."""
    a, b = (before.get("engine") or {}), (after.get("engine") or {})
    ticks = (b.get("ticks") or 0) - (a.get("ticks") or 0)
    if not b or ticks <= 0:
        return None
    spent = {k: (v - (a.get("tick_seconds") or {}).get(k, 0.0)) * 1000 / ticks for k, v in b["tick_seconds"].items()}
    total = spent.pop("total")
    return {**spent, "other": max(total - sum(spent.values()), 0.0), "total": total, "ticks": ticks}


async def _warm_up(url: str, utterances: list[np.ndarray], token: str | None, speakers: list[str],
                   emotions: list[str], options: dict[str, Any]) -> None:
    await run_load(url, 1, 1, utterances[:1], token, speakers=speakers, emotions=emotions, realtime=False,
                   turn_timeout_s=options.get("turn_timeout_s", 120.0))


async def _measure_one(url: str, count: int, batching: bool | None, turns: int, utterances: list[np.ndarray],
                       speakers: list[str], emotions: list[str], token: str | None, pid: int | None,
                       options: dict[str, Any], console: Any, label: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run of `count` sessions against a server that is idle before and after it."""
    label = {"profile": "back-to-back", "levers": "on", **(label or {})}
    await _wait_idle(url, token, timeout=30.0)
    before = await asyncio.to_thread(server_stats, url, token) or {}
    result = await run_load(url, count, turns, utterances, token, speakers=speakers, emotions=emotions, **options)
    await _wait_idle(url, token, timeout=30.0)
    after = await asyncio.to_thread(server_stats, url, token) or {}
    row = {**result.summary(), **label}
    row["batching"] = after.get("batching", batching) if batching is None else batching
    row["server_rss_mb"] = process_rss_mb(pid)
    row["server_stats"] = after
    row["tick_ms"] = tick_profile(before, after)
    row["server_errors_delta"] = ((after.get("errors_total") or 0) - (before.get("errors_total") or 0)
                                  if after else None)
    lat, gaps = row["latency_ms"], row["playback"]
    console.print(f"{count} sessions ({label['profile']}, batching {'on' if row['batching'] else 'off'}, levers "
                  f"{label['levers']}): {row['turns_completed']}/{row['turns_planned']} turns, {row['errors']} errors, "
                  f"{row['dropped']} dropped; latency p50 {_ms(lat['p50'])} p95 {_ms(lat['p95'])} ms, "
                  f"RTF {_num(row['reply_rtf_median'])}, replies with a gap {gaps['with_gap']}/{gaps['replies']}",
                  soft_wrap=True)
    return row


async def _measure(url: str, sessions: list[int], batching: bool | None, turns: int, utterances: list[np.ndarray],
                   speakers: list[str], emotions: list[str], token: str | None, pid: int | None,
                   options: dict[str, Any], console: Any, label: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A warm-up turn, then one run per session count against one server."""
    await _warm_up(url, utterances, token, speakers, emotions, options)
    return [await _measure_one(url, count, batching, turns, utterances, speakers, emotions, token, pid, options,
                               console, label) for count in sessions]


async def _measure_batched(url: str, sessions: list[int], batching: bool | None, turns: int,
                           utterances: list[np.ndarray], speakers: list[str], emotions: list[str], token: str | None,
                           pid: int | None, options: dict[str, Any], console: Any, conversational: list[int],
                           think: ThinkTime | None, capacity_probes: int, capacity_turns: int, ceiling: int
                           ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The main server's runs: back-to-back at each count, conversational ones, the capacity search."""
    rows = await _measure(url, sessions, batching, turns, utterances, speakers, emotions, token, pid, options,
                          console)
    talk = {**options, "think": think or ThinkTime()}
    for count in conversational:
        rows.append(await _measure_one(url, count, batching, turns, utterances, speakers, emotions, token, pid, talk,
                                       console, {"profile": "conversational"}))
    capacity = None
    if capacity_probes > 0:
        async def probe(count: int) -> dict[str, Any]:
            row = await _measure_one(url, count, batching, capacity_turns, utterances, speakers, emotions, token, pid,
                                     options, console, {"profile": "capacity probe"})
            return row

        capacity = await search_capacity(probe, [r for r in rows if r["profile"] == "back-to-back"],
                                         capacity_probes, ceiling)
        console.print(f"capacity: {capacity['sessions']} sessions ({capacity['sessions_per_core']:.1f} per core; "
                      f"failed at {capacity['failed_at']})", soft_wrap=True)
    return rows, capacity


def run_suite(params: Any, *, model: str | None, url: str | None, server_pid: int | None, sessions: list[int],
              turns: int, compare_unbatched: int, soak_seconds: float, soak_sessions: int, soak_sample_every: float,
              turns_per_session: int, options: dict[str, Any], token: str | None, port: int | None,
              overrides: list[str], profile: str | None, utterance_count: int, console: Any,
              log_dir: Path | None = None, command: str | None = None, conversational: list[int] | None = None,
              think: ThinkTime | None = None, compare_levers: int = 0, capacity_probes: int = 0,
              capacity_turns: int = 2, capacity_ceiling: int | None = None) -> dict[str, Any]:
    """Everything `s2s loadtest` measures: runs with batching (and without), the conversational
    profile, the capacity search, levers off, then the soak; returns the report ({meta, runs,
    goals, batching_ratio, levers_ratio, capacity, soak})."""
    conversational = list(conversational or [])
    serving = params.serving
    utterances, speakers, emotions, source = load_utterances(params, utterance_count,
                                                             serving.max_utterance_seconds * 0.95)
    started = _now()
    described = (f"{len(utterances)} utterances: {source}, "
                 f"{np.mean([len(u) for u in utterances]) / SAMPLE_RATE:.2f} s on average")
    notes = []
    runs: list[dict[str, Any]] = []
    soak_summary = None
    ceiling = capacity_ceiling or max(2 * max(sessions), serving.max_sessions)
    needed = max([*sessions, *conversational, compare_unbatched, compare_levers,
                  soak_sessions if soak_seconds > 0 else 0, ceiling if capacity_probes else 0])
    extra = list(overrides)
    if needed > serving.max_sessions:
        extra.append(f"serving.max_sessions={needed}")
        notes.append(f"serving.max_sessions raised to {needed} for the started servers")
    model_info: dict[str, Any] = {}

    def server(batching: bool, label: str, more: list[str] | None = None) -> ServerProcess:
        log = (log_dir / f"loadtest-server-{label}.log") if log_dir else None
        return ServerProcess(model, [*extra, f"serving.batching={str(batching).lower()}", *(more or [])], profile,
                             port, serving.host, log)

    def remember_model(target: str) -> None:
        stats = server_stats(target, token) or {}
        model_info.update(stats.get("model") or {})

    capacity = None
    batched = dict(conversational=conversational, think=think, capacity_probes=capacity_probes,
                   capacity_turns=capacity_turns, ceiling=ceiling)
    if url:
        remember_model(url)
        measured, capacity = asyncio.run(_measure_batched(url, sessions, None, turns, utterances, speakers, emotions,
                                                          token, server_pid, options, console, **batched))
        runs += measured
        if compare_unbatched or compare_levers:
            notes.append("--url: no run with batching or the levers off (a running server cannot be restarted by "
                         "the load test)")
        if soak_seconds > 0:
            soak_summary = _soak(url, server_pid, soak_sessions, soak_seconds, soak_sample_every, turns_per_session,
                                 utterances, speakers, emotions, token, options, console)
    else:
        with server(True, "batched") as proc:
            remember_model(proc.url)
            measured, capacity = asyncio.run(_measure_batched(proc.url, sessions, True, turns, utterances, speakers,
                                                              emotions, token, proc.pid, options, console, **batched))
            runs += measured
        if compare_levers:
            with server(True, "levers-off", LEVERS_OFF) as proc:
                runs += asyncio.run(_measure(proc.url, [compare_levers], True, turns, utterances, speakers,
                                             emotions, token, proc.pid, options, console, {"levers": "off"}))
        if compare_unbatched:
            with server(False, "unbatched") as proc:
                runs += asyncio.run(_measure(proc.url, [compare_unbatched], False, turns, utterances, speakers,
                                             emotions, token, proc.pid, options, console))
        if soak_seconds > 0:
            with server(True, "soak") as proc:
                asyncio.run(run_load(proc.url, 1, 1, utterances[:1], token, realtime=False))  # warm-up
                soak_summary = _soak(proc.url, proc.pid, soak_sessions, soak_seconds, soak_sample_every,
                                     turns_per_session, utterances, speakers, emotions, token, options, console)
    serving_settings = {k: getattr(serving, k) for k in ("temperature", "top_k", "max_reply_seconds",
                                                         "min_reply_seconds", "threads", "max_sessions", "ahead_ms",
                                                         "encode_hops", "precision")}
    if url:
        serving_settings = {"url": url}
    meta = {"command": command or "s2s loadtest", "utterances": described, "started": started, "finished": _now(),
            "machine": machine_info(), "model": model_info,
            "serving": serving_settings, "notes": notes}
    meta["think"] = (think or ThinkTime()).describe() if conversational else None
    return {"meta": meta, "runs": runs, "goals": evaluate_goals(runs, capacity), "batching_ratio": batching_ratio(runs),
            "levers_ratio": levers_ratio(runs), "capacity": capacity, "soak": soak_summary}


def _soak(url: str, pid: int | None, clients: int, seconds: float, every: float, turns_per_session: int,
          utterances: list[np.ndarray], speakers: list[str], emotions: list[str], token: str | None,
          options: dict[str, Any], console: Any) -> dict[str, Any]:
    def show(point: dict[str, Any]) -> None:
        console.print(f"soak t={point['t_s']:.0f}s: RSS {_mb(point['rss_mb'])}, {point['turns']} turns, "
                      f"{point['errors']} errors, {point['dropped']} dropped", soft_wrap=True)

    result = asyncio.run(soak(url, clients, seconds, utterances, token, speakers=speakers, emotions=emotions,
                              turns_per_session=turns_per_session, sample_every_s=every, server_pid=pid,
                              on_sample=show, **{k: v for k, v in options.items() if k not in ("deflate", "playback_buffer_ms")}))
    return result.summary()
