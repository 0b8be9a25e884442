"""The load test (tasks/benchmarks/: client, report, suite) against the app in this process: concurrent clients
complete their turns with latencies measured on the client, refused and timed-out sessions count as
dropped, the soak samples memory, docs/benchmarks.md is written from the figures, and `s2s
loadtest` runs end to end with servers it starts itself."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.benchmarks.load_client import process_rss_mb, run_load, soak
from tasks.benchmarks.load_report import batching_ratio, evaluate_goals, write_benchmarks

from .conftest import speak
from .live_server import LiveServer

QUICK = {"max_reply_seconds": 0.6, "min_reply_seconds": 0.1}


@pytest.fixture(scope="module")
def utterances() -> list[np.ndarray]:
    """Short Telugu utterances (about a second each)."""
    return [speak(t)[:16000] for t in ("నమస్కారం, మీరు ఎలా ఉన్నారు?", "అవును, సరే.", "మన ఊరికి బస్సు ఎప్పుడు?")]


@pytest.fixture(scope="module")
def live(bundle_dir: Path) -> LiveServer:  # noqa: F811
    with LiveServer(bundle_dir, QUICK) as server:
        yield server


def test_concurrent_clients_complete_their_turns_and_the_report_is_written(live: LiveServer,
                                                                           utterances: list[np.ndarray],
                                                                           tmp_path: Path, one_thread):
    _, before = live.get("/stats")
    started = time.monotonic()
    result = asyncio.run(run_load(live.url, 3, 2, utterances, realtime=True, start_spread_s=0.3))
    wall = time.monotonic() - started
    summary = result.summary()
    assert summary["errors"] == 0 and summary["dropped"] == 0 and summary["stray_frames"] == 0, summary
    assert summary["turns_planned"] == summary["turns_completed"] == 6 and summary["sessions_opened"] == 3
    for turn in result.turns:
        assert turn.first_audio_ms > 0 and 0.1 <= turn.reply_seconds <= 0.6 + 1e-9 and turn.reply_rtf > 0
        assert turn.samples == turn.server_metrics["frames"] * 320
        # the client's clock starts before the server's and stops after it
        assert turn.first_audio_ms >= turn.server_metrics["first_audio_ms"] - 1.0
    latency = summary["latency_ms"]
    assert latency["count"] == 6 and 0 < latency["min"] <= latency["p50"] <= latency["p95"] <= latency["max"]
    assert summary["reply_rtf_median"] > 0
    # paced in real time: two turns of ~1 s speech plus listening to the replies take seconds, not ms
    assert wall >= 2 * 1.0
    _, after = live.get("/stats")
    assert after["replies_total"] - before["replies_total"] == 6 and after["sessions"] == 0

    summary["batching"] = True
    summary["server_rss_mb"] = process_rss_mb(os.getpid())
    path = write_benchmarks(tmp_path / "docs" / "benchmarks.md", [summary],
                            {"command": "s2s loadtest --sessions 3", "model": after["model"],
                             "serving": {"max_reply_seconds": 0.6}})
    text = path.read_text()
    assert text.startswith("# Serving benchmarks") and "Written by `s2s loadtest --sessions 3`" in text
    assert "| sessions | batching | turns | errors | dropped | mean | p50 | p95 | p99 | std |" in text
    assert f"| 3 | on | 6/6 | 0 | 0 | {latency['mean']:.1f} | {latency['p50']:.1f} | {latency['p95']:.1f} |" in text
    assert "| p95 < 150 ms at 1 session | not measured | not measured |" in text
    assert "## Soak" in text and "Not run" in text
    assert "| cores |" in text and f"| {os.cpu_count()} |" in text
    assert not list(path.parent.glob(".benchmarks.md.*")), "written atomically, no temporary left behind"


def test_server_vad_turns_are_measured_from_the_servers_end_of_utterance(live: LiveServer,
                                                                         utterances: list[np.ndarray], one_thread):
    result = asyncio.run(run_load(live.url, 2, 1, utterances, vad="server", realtime=False, trailing_silence_s=1.2))
    summary = result.summary()
    assert summary["errors"] == 0 and summary["dropped"] == 0 and summary["turns_completed"] == 2, summary
    assert all(t.first_audio_ms > 0 for t in result.turns)


def test_refused_and_timed_out_sessions_count_as_dropped(bundle_dir: Path, utterances: list[np.ndarray],  # noqa: F811
                                                         one_thread):
    with LiveServer(bundle_dir, {**QUICK, "max_sessions": 2}) as server:
        result = asyncio.run(run_load(server.url, 3, 2, utterances, realtime=True, start_spread_s=0.0))
    summary = result.summary()
    assert summary["dropped"] == 1 and summary["turns_completed"] == 4, summary
    assert list(summary["drop_reasons"]) == ["closed 1013 server full: 2 sessions"]

    with LiveServer(bundle_dir, {**QUICK, "max_session_seconds": 2.5}) as server:
        result = asyncio.run(run_load(server.url, 1, 5, utterances, realtime=True))
    summary = result.summary()
    assert summary["dropped"] == 1 and 0 < summary["turns_completed"] < 5, summary
    assert list(summary["drop_reasons"])[0].startswith("closed 1008 session longer than 2.5 s")


def test_soak_samples_the_servers_memory(live: LiveServer, utterances: list[np.ndarray], one_thread):
    samples = []
    result = asyncio.run(soak(live.url, 2, 3.0, utterances, realtime=False, turns_per_session=2, sample_every_s=1.0,
                              server_pid=os.getpid(), on_sample=samples.append))
    summary = result.summary()
    assert summary["errors"] == 0 and summary["dropped"] == 0, summary
    assert summary["turns_completed"] >= 4 and summary["sessions_opened"] > 2, "sessions of 2 turns reconnect"
    assert samples == summary["samples"] and len(samples) >= 3, "start, about once a second, end"
    assert samples[0]["t_s"] == 0 and samples[-1]["t_s"] >= 3.0 and samples[-1]["server_sessions"] == 0
    assert all(s["rss_mb"] > 10 for s in samples)
    memory = summary["memory_mb"]
    assert memory["start"] == samples[0]["rss_mb"] and memory["end"] == samples[-1]["rss_mb"]
    assert memory["max"] >= max(memory["start"], memory["end"]) and memory["growth"] == memory["end"] - memory["start"]
    assert summary["latency_ms"]["count"] == summary["turns_completed"]


def _row(clients: int, batching: bool, p95: float, mean: float, std: float, errors: int = 0, dropped: int = 0,
         done: int | None = None) -> dict:
    turns = clients * 3
    return {"clients": clients, "batching": batching, "turns_planned": turns,
            "turns_completed": turns if done is None else done, "errors": errors, "dropped": dropped,
            "error_codes": {"busy": errors} if errors else {}, "drop_reasons": {},
            "latency_ms": {"count": turns, "mean": mean, "p50": mean, "p95": p95, "p99": p95, "std": std,
                           "min": 1.0, "max": p95},
            "server_latency_ms": {"p95": p95 - 2}, "reply_rtf_median": 3.0, "send_lag_ms": {"p99": 1.0},
            "server_rss_mb": 500.0, "settings": {"chunk_ms": 20, "realtime": True, "vad": "client"}}


def test_goals_ratio_and_soak_section_of_the_report(tmp_path: Path):
    runs = [_row(1, True, 120.0, 80.0, 25.0), _row(10, True, 150.0, 90.0, 20.0), _row(100, True, 280.0, 150.0, 40.0),
            _row(100, False, 1400.0, 600.0, 300.0, errors=2)]
    goals = {g["goal"]: g for g in evaluate_goals(runs)}
    assert goals["0 errors at 100 sessions"]["status"] == "met", "the batched run counts, not the unbatched one"
    assert goals["p95 < 150 ms at 1 session"]["status"] == "met"
    assert goals["p95 < 300 ms at 100 sessions"]["status"] == "met"
    assert goals["std < 20 ms at 1 session"] == {"goal": "std < 20 ms at 1 session", "measured": "25.0 ms",
                                                 "status": "missed"}
    ratio = batching_ratio(runs)
    assert ratio["sessions"] == 100 and ratio["p95_ratio"] == pytest.approx(5.0) and ratio["mean_ratio"] == 4.0
    soak_summary = {"seconds": 600.0, "clients": 50, "turns_completed": 4000, "turns_failed": 0,
                    "sessions_opened": 420, "errors": 0, "dropped": 0, "error_codes": {}, "drop_reasons": {},
                    "memory_mb": {"start": 600.0, "end": 612.5, "max": 640.0, "growth": 12.5, "growth_pct": 2.08},
                    "latency_ms": {"p50": 90.0, "p95": 200.0}, "latency_p95_first_half_ms": 190.0,
                    "latency_p95_second_half_ms": 210.0, "settings": {"turns_per_session": 10},
                    "samples": [{"t_s": 0.0, "rss_mb": 600.0, "turns": 0, "errors": 0, "dropped": 0,
                                 "server_sessions": 0}]}
    text = write_benchmarks(tmp_path / "benchmarks.md", runs, {"command": "s2s loadtest", "model": {"uri": "m"}},
                            soak_summary).read_text()
    assert "| 100 | off | 300/300 | 2 | 0 | 600.0 | 600.0 | 1400.0 |" in text
    assert "| std < 20 ms at 1 session | 25.0 ms | **missed** |" in text
    assert "| p95 | 280.0 ms | 1400.0 ms | 5.00x |" in text and "| mean | 150.0 ms | 600.0 ms | 4.00x |" in text
    assert "- 100 sessions, batching off: busy x2" in text
    assert "| server RSS start / end / max | 600.0 MiB / 612.5 MiB / 640.0 MiB |" in text
    assert "| RSS growth | +12.5 MiB (+2.1 %) |" in text and "| dropped sessions | 0 |" in text
    assert "| no reply with a playback gap at 100 sessions | not measured | not measured |" in text
    gapped = {**_row(100, True, 250.0, 100.0, 10.0), "playback": {"replies": 300, "with_gap": 3, "share_with_gap": 0.01,
                                                                  "gap_total_s": 0.42, "gap_s": {"max": 0.2}}}
    capacity = {"sessions": 60, "sessions_per_core": 30.0, "cores": 2, "failed_at": 75, "ceiling": 256,
                "rule": "p95 first audio < 300 ms", "probes": [{"sessions": 75, "passed": False, "p95_ms": 410.0,
                                                                 "with_gap": 4, "why": "p95 410 ms"}]}
    levers_off = {**_row(100, True, 900.0, 400.0, 10.0), "levers": "off"}
    goals = {g["goal"]: g for g in evaluate_goals([gapped], capacity)}
    assert goals["no reply with a playback gap at 100 sessions"] == {
        "goal": "no reply with a playback gap at 100 sessions", "status": "missed",
        "measured": "3/300 replies with a gap (0.42 s in all)"}
    assert goals["capacity >= 100 sessions"]["measured"] == "60 sessions (30.0 per core)"
    text = write_benchmarks(tmp_path / "b2.md", [gapped, levers_off], {"command": "s2s loadtest"},
                            capacity=capacity).read_text()
    assert "**60 sessions on 2 cores: 30.0 sessions per core**" in text and "| 75 | fail | 410.0 | 4 | p95 410 ms |" in text
    assert "| 3/300 (1 %) | 0.20 | back-to-back | on |" in text and "| p95 | 250.0 ms | 900.0 ms | 3.60x |" in text
    errors = {g["goal"]: g for g in evaluate_goals([_row(100, True, 250.0, 100.0, 10.0, done=299, dropped=1)])}
    assert errors["0 errors at 100 sessions"] == {"goal": "0 errors at 100 sessions", "status": "missed",
                                                  "measured": "0 errors, 1 dropped, 299/300 turns"}


def test_the_loadtest_command_starts_its_servers_and_writes_the_report(bundle_dir: Path,  # noqa: F811
                                                                       project_root: Path, tmp_path: Path):
    """`s2s loadtest` end to end: servers started as subprocesses (batching on, off, soak), no corpus in
    this project root (espeak-ng speech instead), the report and the JSON written."""
    import typer
    from typer.testing import CliRunner

    from s2s.bench_commands import loadtest_command

    app = typer.Typer()
    app.command()(loadtest_command)
    out, figures = tmp_path / "benchmarks.md", tmp_path / "loadtest.json"
    result = CliRunner().invoke(app, ["--model", str(bundle_dir), "--sessions", "1,2", "--turns", "1",
                                      "--compare-unbatched", "2", "--soak-seconds", "2", "--soak-sessions", "2",
                                      "--soak-sample-every", "1", "--no-realtime", "--utterances", "2",
                                      "--conversational", "2", "--think-median", "0.2", "--capacity-probes", "1",
                                      "--compare-levers", "2", "--engine-profile", "2",
                                      "--set", "serving.max_reply_seconds=0.4",
                                      "--set", "serving.min_reply_seconds=0.1",
                                      "--out", str(out), "--json", str(figures)])
    assert result.exit_code == 0, result.output
    report = json.loads(figures.read_text())
    assert [(r["clients"], r["batching"], r["profile"], r["levers"], r["turns_completed"], r["errors"], r["dropped"])
            for r in report["runs"]] == [(1, True, "back-to-back", "on", 1, 0, 0), (2, True, "back-to-back", "on", 2, 0, 0),
                                         (2, True, "conversational", "on", 2, 0, 0), (2, True, "back-to-back", "off", 2, 0, 0),
                                         (2, False, "back-to-back", "on", 2, 0, 0)]
    assert all(r["server_rss_mb"] > 10 and r["server_stats"]["sessions"] == 0 for r in report["runs"])
    assert report["runs"][4]["server_stats"]["batching"] is False
    assert report["runs"][3]["server_stats"]["engine"]["ahead_ms"] == 0
    assert report["runs"][3]["server_stats"]["engine"]["encode_hops"] == 1
    assert all(r["playback"]["replies"] == r["turns_completed"] and r["tick_ms"]["ticks"] > 0 for r in report["runs"])
    capacity = report["capacity"]
    assert len(capacity["probes"]) <= 1 and capacity["cores"] == os.cpu_count()
    assert capacity["sessions_per_core"] == capacity["sessions"] / capacity["cores"]
    assert [s["setup"] for s in report["engine_profile"]["setups"]][0].startswith("baseline")
    assert report["soak"]["errors"] == 0 and report["soak"]["memory_mb"]["start"] > 10
    assert report["meta"]["model"]["uri"] == str(bundle_dir)
    assert "espeak-ng (no corpus found)" in report["meta"]["utterances"]
    text = out.read_text()
    assert f"Written by `s2s loadtest --model {bundle_dir} --sessions 1,2 --turns 1 --compare-unbatched 2" in text
    assert "| 2 | off | 2/2 | 0 | 0 |" in text and "## Soak" in text and "At 2 sessions" in text
    assert "## Capacity" in text and "sessions per core" in text and "## Engine levers on vs off" in text
    assert "## One engine tick at 2 sessions, by part" in text and "## Engine ticks under load" in text
    assert "Conversational profile: as back-to-back, plus a log-normal think time" in text
    assert (project_root / "artifacts" / "loadtest-server-soak.log").is_file()
