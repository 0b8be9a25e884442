"""`s2s bench engine`: where one engine tick's time goes at N sessions, by part (encode, S2S step,
codec decode, the rest: commands, scheduling, delivery), for the engine's levers one after
another in one process, so each is a ratio against the baseline measured minutes apart on the
same machine under the same load.

The tick is the issue's worst case: N sessions replying (one S2S step and one decoder frame
each) while N other sessions talk (one 20 ms hop of audio each arrives per tick). At real time a
tick has 20 ms: `x real time` is 20 ms over the tick's time. The engine runs on this thread
(Engine.tick, no engine thread, no sockets), with the serving code unchanged.

The parts are timed in CPU time of this process (time.process_time: with intra-op threads, the
CPU of all of them), which other processes on a shared machine do not inflate; the wall time per
tick is reported beside it and is what a quiet machine's latency follows.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from serving.bundle import ModelBundle
from serving.engine import Engine, ReplyEvent
from serving.precision import with_precision
from serving.turns import GenerationSettings

FRAME_MS = 20.0


@dataclass(frozen=True)
class Setup:
    name: str
    threads: int = 1
    encode_hops: int = 1
    precision: str = "fp32"


SETUPS = (Setup("baseline (1 thread, 1-hop encode, fp32)"), Setup("encode 4 hops at a time", encode_hops=4),
          Setup("2 intra-op threads", threads=2), Setup("int8 linear layers", precision="int8"),
          Setup("4-hop encode + int8", encode_hops=4, precision="int8"))


def _ignore(event: ReplyEvent) -> None:
    pass


def profile_setup(bundle: ModelBundle, setup: Setup, sessions: int, ticks: int, utterances: list[np.ndarray],
                  warmup_ticks: int = 4, by_op: int = 0) -> dict[str, Any]:
    """Mean ms per tick by part, with `sessions` replying and `sessions` talking, over `ticks` ticks.
    `by_op` > 0: the measured ticks also run under torch.profiler and the row gets `ops`, the
    `by_op` operators with the most CPU time of their own (the profiler's cost inflates the part
    figures of that run: take those from a run without it)."""
    hop = bundle.codec.hop_length
    seconds = (ticks + warmup_ticks + 2 * bundle.s2s.config.n_streams + 8) * hop / bundle.sample_rate
    settings = GenerationSettings(max_reply_seconds=seconds, min_reply_seconds=seconds)  # no reply ends early
    engine = Engine(with_precision(bundle, setup.precision), settings, max_sessions=2 * sessions,
                    threads=setup.threads, encode_hops=setup.encode_hops)
    engine.profile.clock = time.process_time
    previous = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    try:
        with torch.inference_mode():
            listeners = [engine.open("female_young", "neutral", _ignore) for _ in range(sessions)]
            for i, cid in enumerate(listeners):
                engine.post_audio(cid, utterances[i % len(utterances)])
                engine.post_end(cid)
            while engine.live < sessions:
                engine.tick()
            talkers = [engine.open("male_young", "neutral", _ignore) for _ in range(sessions)]
            position = 0

            def talk_tick() -> None:
                nonlocal position
                for i, cid in enumerate(talkers):
                    audio = utterances[i % len(utterances)]
                    start = position % max(len(audio) - hop, 1)
                    engine.post_audio(cid, audio[start: start + hop])
                position += hop
                engine.tick()

            for _ in range(warmup_ticks):
                talk_tick()
            engine.profile.reset()
            stepped = len(engine.batch_sizes)
            positions = engine.cache.lengths[: engine.live]
            span = [int(positions.min()), int(positions.max())] if engine.live else [0, 0]
            began = time.perf_counter()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if by_op else nullcontext() as prof:
                for _ in range(ticks):
                    talk_tick()
            wall = time.perf_counter() - began
    finally:
        torch.set_num_threads(previous)
    figures = engine.profile.per_tick_ms()
    rows = engine.batch_sizes[stepped:]
    return {"setup": setup.name, "threads": setup.threads, "encode_hops": setup.encode_hops,
            "precision": setup.precision, **{k: round(v, 2) for k, v in figures.items()},
            "wall_ms": round(wall * 1000 / ticks, 2), "rows_stepped_mean": float(np.mean(rows)) if rows else 0.0,
            "x_real_time": round(FRAME_MS / figures["total"], 3) if figures["total"] else None,
            "positions": span, **({"ops": top_ops(prof, ticks, by_op)} if by_op else {})}


def top_ops(prof: torch.profiler.profile, ticks: int, count: int) -> list[dict[str, Any]]:
    """The `count` operators with the most self CPU time, in ms and calls per tick."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000 / ticks, 2),
             "calls": round(e.count / ticks, 1)} for e in events]


def profile_engine(bundle: ModelBundle, sessions: int = 100, ticks: int = 20, utterances: list[np.ndarray] | None = None,
                   setups: tuple[Setup, ...] = SETUPS, by_op: int = 0) -> dict[str, Any]:
    """Every setup in turn; each row gets `ratio`: its total / the first setup's (the baseline).
    `by_op` > 0: one more run of the first setup under torch.profiler, its top operators as `ops`."""
    if utterances is None:
        rng = np.random.default_rng(0)
        utterances = [(0.1 * rng.standard_normal(bundle.sample_rate)).astype(np.float32)]
    rows = [profile_setup(bundle, setup, sessions, ticks, utterances) for setup in setups]
    base = rows[0]["total"]
    for row in rows:
        row["ratio"] = round(row["total"] / base, 3) if base else None
    report: dict[str, Any] = {"sessions": sessions, "ticks": ticks, "setups": rows}
    if by_op:
        report["ops"] = profile_setup(bundle, setups[0], sessions, ticks, utterances, by_op=by_op)["ops"]
    return report


def engine_profile_markdown(report: dict[str, Any], command: str) -> str:
    """The report as a docs/benchmarks.md section."""
    from tasks.benchmarks.load_report import md_table

    rows = [[r["setup"], *(f"{r[k]:.1f}" for k in ("encode", "step", "decode", "other", "total")),
             f"{r['ratio']:.2f}", f"{r['x_real_time']:.2f}", f"{r['wall_ms']:.1f}"] for r in report["setups"]]
    return "\n".join(["", f"## One engine tick at {report['sessions']} sessions, by part", "",
                      f"`{command}`, in one process, setups one after another ({report['ticks']} ticks each): "
                      f"{report['sessions']} sessions replying (one S2S step and one decoded frame each) while "
                      f"{report['sessions']} others talk (a 20 ms hop each arrives per tick). CPU milliseconds "
                      "per tick (all of the process's threads); / baseline: total over the first setup's; x real "
                      "time: 20 ms over the CPU total (above 1: one core keeps up); wall: milliseconds per tick "
                      "on the clock (on a busy machine, inflated by other processes).", "",
                      *md_table(["setup", "encode", "S2S step", "decode", "other", "total", "/ baseline",
                                 "x real time", "wall"], rows, "lrrrrrrrr")])
