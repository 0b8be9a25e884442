"""`s2s bench` and `s2s loadtest`: figures that are not gates (docs/benchmarks.md).

The load test itself is tasks/benchmarks/ (client, server launcher, report, suite); this is its
command line."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from core.config import ConfigError, load_params, parse_overrides
from s2s.common import ProfileOpt, SetOpt, _fail, _params, app, bench_app, console


@bench_app.command("segment")
def bench_segment(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                  json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures here")) -> None:
    """Segmentation against the synthetic ground truth, and VAD + quality throughput."""
    from tasks.benchmarks.bench_segment import print_report, run_benchmark

    try:
        params = load_params(profile, parse_overrides(set_))
    except ConfigError as exc:
        _fail(str(exc))
    report = run_benchmark(params)
    print_report(report, console)
    if json_out:
        from core import atomic

        atomic.write_text(json_out, json.dumps(report, indent=2) + "\n")


@bench_app.command("codec")
def bench_codec_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                    threads: int = typer.Option(1, help="torch threads (1 = one CPU stream)")) -> None:
    """Encode/decode real-time factors and streaming decode latency of the trained codec."""
    from tasks.benchmarks.bench_models import bench_codec

    _print_figures("s2s bench codec", bench_codec(_params(profile, set_), threads=threads))


@bench_app.command("s2s")
def bench_s2s_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                  threads: int = typer.Option(1, help="torch threads")) -> None:
    """Generation tokens/s at batch 1 and 64 with the KV cache, and time to the first reply frame."""
    from tasks.benchmarks.bench_models import bench_s2s

    _print_figures("s2s bench s2s", bench_s2s(_params(profile, set_), threads=threads))


@bench_app.command("engine")
def bench_engine_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                     model: Optional[str] = typer.Option(None, help="model (default: serving.model)"),
                     sessions: int = typer.Option(100, min=1, help="sessions replying (and as many talking)"),
                     ticks: int = typer.Option(20, min=4, help="ticks measured per setup"),
                     json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures here"),
                     by_op: int = typer.Option(0, min=0, help="also profile the baseline by operator (torch.profiler): "
                                                              "this many with the most CPU time"),
                     only_baseline: bool = typer.Option(False, help="the baseline setup only (no levers)")) -> None:
    """One engine tick at N sessions by part (encode, S2S step, decode, other), for each lever in turn."""
    from serving.bundle import BundleError
    from serving.server import load_model
    from tasks.benchmarks.engine_profile import SETUPS, profile_engine

    params = _params(profile, set_)
    try:
        bundle, _ = load_model(params, model)
    except BundleError as exc:
        _fail(str(exc))
    report = profile_engine(bundle, sessions, ticks, _engine_utterances(params),
                            SETUPS[:1] if only_baseline else SETUPS, by_op)
    table = Table(title=f"one engine tick at {sessions} sessions (CPU ms; wall ms last)")
    for column in ("setup", "encode", "step", "decode", "other", "total", "/ baseline", "x real time", "wall"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for r in report["setups"]:
        table.add_row(r["setup"], *(f"{r[k]:.1f}" for k in ("encode", "step", "decode", "other", "total")),
                      f"{r['ratio']:.2f}", f"{r['x_real_time']:.2f}", f"{r['wall_ms']:.1f}")
    console.print(table)
    if by_op:
        ops = Table(title=f"baseline by operator (self CPU ms per tick, under the profiler; rows at positions "
                          f"{report['setups'][0]['positions']})")
        for column in ("operator", "ms", "calls"):
            ops.add_column(column, justify="left" if column == "operator" else "right")
        for op in report["ops"]:
            ops.add_row(op["op"], f"{op['self_ms']:.2f}", f"{op['calls']:g}")
        console.print(ops)
    if json_out:
        from core import atomic

        atomic.write_text(json_out, json.dumps(report, indent=2) + "\n")


@bench_app.command("precision")
def bench_precision_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                        model: Optional[str] = typer.Option(None, help="model (default: serving.model)"),
                        precision: str = typer.Option("int8", help="the reduced precision to compare with fp32"),
                        json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures here")
                        ) -> None:
    """The quality evaluation of one bundle at fp32 and at a reduced serving precision, side by side."""
    from serving.bundle import BundleError
    from serving.server import load_model
    from tasks.benchmarks.precision_quality import compare_precision

    params = _params(profile, set_)
    try:
        bundle, uri = load_model(params, model)
    except BundleError as exc:
        _fail(str(exc))
    report = compare_precision(bundle, params, str(bundle.meta.get("sha256", {}).get("s2s.pt", "bundle"))[:12],
                               precision)
    table = Table(title=f"quality of {uri}: fp32 vs {precision}")
    for column in ("figure", "fp32", precision, "difference"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for key, base, other, diff in report["rows"]:
        table.add_row(key, f"{base:.4g}", "-" if other is None else f"{other:.4g}", "-" if diff is None else f"{diff:+.4g}")
    console.print(table)
    if json_out:
        from core import atomic

        atomic.write_text(json_out, json.dumps(report, indent=2) + "\n")


def _engine_utterances(params: Any) -> list:
    """A few user turns to encode (test split, else espeak-ng speech)."""
    from tasks.benchmarks.loadtest import load_utterances

    return load_utterances(params, 8, params.serving.max_utterance_seconds * 0.95)[0]


def _print_figures(title: str, figures: dict) -> None:
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, str(value))
    console.print(table)
    console.print_json(data=figures)


def _command_line(ctx: Any) -> str:
    """`s2s loadtest` and the options given (those not at their defaults), as the report header shows."""
    if ctx is None:
        return "s2s loadtest"
    path = ctx.command_path if ctx.command_path.startswith("s2s ") else "s2s loadtest"
    parts = path.split()
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value == param.default or value is None or value == []:
            continue
        if getattr(param, "is_flag", False):
            parts.append(param.opts[0] if value else (param.secondary_opts or param.opts)[0])
            continue
        for item in (value if getattr(param, "multiple", False) else [value]):
            parts += [param.opts[0], str(item)]
    return shlex.join(parts)


@app.command("loadtest", help="Concurrent WebSocket clients speaking test-split utterances: latency, errors, "
                              "drops; writes docs/benchmarks.md.")
def loadtest_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, help="model to serve: models:/name@alias, models:/name/N or a bundle "
                                                   "folder (default: serving.model)"),
    url: Optional[str] = typer.Option(None, help="ws://HOST:PORT/ws of a running server: no server is started and "
                                                 "there is no batching-off run"),
    server_pid: Optional[int] = typer.Option(None, help="with --url: the server's pid, for its memory (RSS)"),
    sessions: str = typer.Option("1,10,50,100", help="concurrent sessions of each run (batching on), comma-separated"),
    turns: int = typer.Option(3, min=1, help="turns per session"),
    compare_unbatched: int = typer.Option(100, help="also run this many sessions with serving.batching=false "
                                                    "(0: no such run)"),
    soak_seconds: float = typer.Option(600.0, help="soak duration in seconds (0: no soak)"),
    soak_sessions: int = typer.Option(50, min=1, help="sessions of the soak"),
    soak_sample_every: float = typer.Option(30.0, help="seconds between the soak's memory samples"),
    soak_turns_per_session: int = typer.Option(10, min=1, help="soak: turns before a session stops and reconnects"),
    realtime: bool = typer.Option(True, "--realtime/--no-realtime", help="pace the audio as a microphone does and "
                                                                        "listen to each reply (or send at once)"),
    vad: str = typer.Option("client", help="client (send end_of_utterance) or server (trailing silence)"),
    chunk_ms: int = typer.Option(20, min=1, help="audio per binary frame"),
    spread: Optional[float] = typer.Option(None, help="seconds over which the clients start (default: one "
                                                      "utterance length)"),
    utterances: int = typer.Option(32, min=1, help="distinct test-split user turns to cycle through"),
    turn_timeout: float = typer.Option(120.0, help="seconds a turn may take before its session counts as dropped"),
    port: Optional[int] = typer.Option(None, help="port of the started server (default: a free one)"),
    token: Optional[str] = typer.Option(None, help="API token (default: the variable serving.token_env names)"),
    out: Optional[Path] = typer.Option(None, help="the report (default: docs/benchmarks.md of the project)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="every figure as JSON (default: "
                                                                 "artifacts/loadtest.json)"),
    strict: bool = typer.Option(False, "--strict", help="exit code 1 when a goal is missed"),
    conversational: str = typer.Option("100", help="session counts also run with the conversational profile "
                                                   "(think time between turns), comma-separated ('' or 0: none)"),
    think_median: float = typer.Option(1.5, help="conversational profile: median think time (s, log-normal)"),
    think_sigma: float = typer.Option(0.6, help="conversational profile: sigma of the think time's log"),
    seed: int = typer.Option(0, help="seed of the think times"),
    playback_buffer_ms: float = typer.Option(50.0, help="jitter buffer of the player whose gaps are counted "
                                             "(50: the demo page starts a reply 50 ms after its first "
                                             "frame, PLAYBACK_LEAD_S in serving/static/app.js)"),
    capacity_probes: int = typer.Option(4, min=0, help="runs of the capacity search (0: no search)"),
    capacity_turns: int = typer.Option(2, min=1, help="turns per session of each capacity probe"),
    compare_levers: int = typer.Option(100, min=0, help="also run this many sessions with the engine's levers off "
                                                        "(deadline scheduling, chunked encode, precision; 0: no)"),
    engine_profile: int = typer.Option(100, min=0, help="profile one engine tick at this many sessions, each lever "
                                                        "in turn, in this process (0: no profile)"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="params.yaml profile (smoke, production)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a parameter (also of the started "
                                                                  "servers): section.key=value (repeatable)"),
) -> None:
    """Load-test the /ws server: latency and errors at 1-100 sessions, batching on vs off, a soak;
    writes docs/benchmarks.md."""
    from core import atomic
    from tasks.benchmarks.load_client import LoadTestError
    from tasks.benchmarks.load_report import print_results, write_benchmarks
    from tasks.benchmarks.loadtest import _session_counts, run_suite
    from tasks.benchmarks.playback import ThinkTime

    command = _command_line(ctx)

    def fail(message: str) -> None:
        console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
        raise typer.Exit(code=2)

    try:
        params = load_params(profile, parse_overrides(set_))
        counts = _session_counts(sessions)
    except (ConfigError, LoadTestError) as exc:
        fail(str(exc))
    if vad not in ("client", "server"):
        fail(f"--vad {vad!r}: client or server")
    token = token or os.environ.get(params.serving.token_env) or None
    root = params.root
    out_path = out or root / "docs" / "benchmarks.md"
    json_path = json_out or params.path(params.paths.artifacts) / "loadtest.json"
    options = {"chunk_ms": chunk_ms, "realtime": realtime, "start_spread_s": spread, "vad": vad,
               "turn_timeout_s": turn_timeout, "playback_buffer_ms": playback_buffer_ms}
    try:
        talk_counts = _session_counts(conversational) if conversational.strip() not in ("", "0") else []
        think = ThinkTime(think_median, think_sigma, seed=seed)
    except (LoadTestError, ValueError) as exc:
        fail(str(exc))
    profile_section = None
    if engine_profile:
        from serving.bundle import BundleError
        from serving.server import load_model
        from tasks.benchmarks.engine_profile import engine_profile_markdown, profile_engine

        try:
            bundle, _ = load_model(params, model)
        except BundleError as exc:
            fail(str(exc))
        console.print(f"profiling one engine tick at {engine_profile} sessions, each lever in turn", soft_wrap=True)
        tick_report = profile_engine(bundle, engine_profile, 20, _engine_utterances(params))
        del bundle
        profile_section = engine_profile_markdown(tick_report, command)
    try:
        report = run_suite(params, model=model, url=url, server_pid=server_pid, sessions=counts, turns=turns,
                           compare_unbatched=compare_unbatched, soak_seconds=soak_seconds, soak_sessions=soak_sessions,
                           soak_sample_every=soak_sample_every, turns_per_session=soak_turns_per_session,
                           options=options, token=token, port=port, overrides=list(set_ or []), profile=profile,
                           utterance_count=utterances, console=console,
                           log_dir=params.path(params.paths.artifacts), command=command,
                           conversational=talk_counts, think=think, compare_levers=compare_levers,
                           capacity_probes=capacity_probes, capacity_turns=capacity_turns)
        report["engine_profile"] = tick_report if engine_profile else None
    except LoadTestError as exc:
        fail(str(exc))
    print_results(console, report["runs"], report["soak"])
    write_benchmarks(out_path, report["runs"], report["meta"], report["soak"], root=root,
                     capacity=report["capacity"], engine_profile=profile_section)
    atomic.write_json(json_path, report)
    console.print(f"report written to {out_path}; figures in {json_path}", soft_wrap=True)
    if strict and any(g["status"] == "missed" for g in report["goals"]):
        raise typer.Exit(code=1)
