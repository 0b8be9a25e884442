"""Load generator for the /ws server (docs/protocol.md) and the report it writes, docs/benchmarks.md.

`run_load` opens N concurrent WebSocket sessions from one asyncio loop, as N callers would: each
starts, then per turn streams a real user utterance (PCM16 at 16 kHz) in 20 ms chunks paced in
real time against absolute deadlines (a microphone does not drift), sends `end_of_utterance` and
reads the reply to `reply_end`. Client starts are staggered so that turns do not all align.

Measured on the client, per turn: the first-audio latency (from sending `end_of_utterance`, or from
receiving the server's `end_of_utterance` with server VAD, to the first binary frame), the reply's
length and its real-time factor (reply audio seconds / wall seconds from end of utterance to
`reply_end`). Per run: error frames, dropped sessions (an unexpected close, a timeout or an
exception), the server's /stats afterwards and its memory (RSS from /proc) when its pid is known.

`soak` keeps clients talking for a while (sessions of a few turns, reconnecting) and samples the
server's memory and errors over time.

`loadtest_command` is the `s2s loadtest` command: it starts the server itself (`s2s serve` in a
subprocess, once with batching and once without, and a fresh one for the soak) or targets a
running one (`--url`), and writes docs/benchmarks.md and a JSON file of every figure.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import typer

from core.labels import EMOTIONS, SPEAKERS

SAMPLE_RATE = 16000
STOP = json.dumps({"type": "stop"})
END_OF_UTTERANCE = json.dumps({"type": "end_of_utterance"})
GOAL_SESSIONS = 100  # the goals are stated at 1 and 100 sessions


class LoadTestError(RuntimeError):
    """A load test that cannot run (no server, wrong sample rate, no utterances); the message says why."""


# --- figures ---------------------------------------------------------------------------------------


def describe(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p95, p99, std, min, max of `values` (None when there are none)."""
    data = np.asarray(values, dtype=float)
    if not data.size:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "std": None, "min": None,
                "max": None}
    return {"count": int(data.size), "mean": float(data.mean()), "p50": float(np.percentile(data, 50)),
            "p95": float(np.percentile(data, 95)), "p99": float(np.percentile(data, 99)),
            "std": float(data.std()), "min": float(data.min()), "max": float(data.max())}


@dataclass
class TurnRecord:
    """One turn of one client, as the client saw it (times are time.perf_counter())."""

    client: int
    turn: int
    utterance_s: float
    eou_at: float | None = None          # end_of_utterance sent (client VAD) or received (server VAD)
    first_at: float | None = None        # first binary frame of the reply
    end_at: float | None = None          # reply_end
    samples: int = 0                     # reply samples received
    server_metrics: dict[str, Any] | None = None
    error: str | None = None             # the error code that ended the turn
    send_lag_ms: float = 0.0             # how late the client's paced chunks went out, at worst
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)   # the utterance was closed

    @property
    def completed(self) -> bool:
        return self.end_at is not None and self.error is None

    @property
    def first_audio_ms(self) -> float | None:
        if self.first_at is None or self.eou_at is None:
            return None
        return (self.first_at - self.eou_at) * 1000

    @property
    def reply_seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def reply_rtf(self) -> float | None:
        if self.end_at is None or self.eou_at is None:
            return None
        return self.reply_seconds / max(self.end_at - self.eou_at, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        server = self.server_metrics or {}
        return {"client": self.client, "turn": self.turn, "utterance_s": round(self.utterance_s, 3),
                "first_audio_ms": self.first_audio_ms, "reply_seconds": self.reply_seconds,
                "reply_rtf": self.reply_rtf, "server_first_audio_ms": server.get("first_audio_ms"),
                "error": self.error, "send_lag_ms": round(self.send_lag_ms, 2)}


@dataclass
class LoadResult:
    """What the clients of one run saw."""

    clients: int
    turns_per_client: int | None                  # None: as many as fitted (soak)
    settings: dict[str, Any] = field(default_factory=dict)
    turns: list[TurnRecord] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)    # error frames: client, turn, code, message
    dropped: list[dict[str, Any]] = field(default_factory=list)   # client, reason, close_code
    sessions_opened: int = 0
    stray_frames: int = 0                          # reply audio outside any turn: a protocol violation
    wall_s: float = 0.0

    @property
    def completed(self) -> list[TurnRecord]:
        return [t for t in self.turns if t.completed]

    def summary(self) -> dict[str, Any]:
        done = self.completed
        firsts = [t.first_audio_ms for t in done if t.first_audio_ms is not None]
        server = [t.server_metrics.get("first_audio_ms") for t in done if t.server_metrics]
        rtfs = [t.reply_rtf for t in done if t.reply_rtf is not None]
        lags = [t.send_lag_ms for t in self.turns]
        planned = self.clients * self.turns_per_client if self.turns_per_client is not None else None
        return {
            "clients": self.clients, "turns_per_client": self.turns_per_client, "turns_planned": planned,
            "turns_completed": len(done), "turns_failed": len(self.turns) - len(done),
            "sessions_opened": self.sessions_opened,
            "errors": len(self.errors), "error_codes": dict(collections.Counter(e["code"] for e in self.errors)),
            "dropped": len(self.dropped),
            "drop_reasons": dict(collections.Counter(d["reason"] for d in self.dropped)),
            "stray_frames": self.stray_frames,
            "latency_ms": describe(firsts),
            "server_latency_ms": describe([s for s in server if s is not None]),
            "reply_rtf_median": float(np.median(rtfs)) if rtfs else None,
            "reply_seconds_mean": float(np.mean([t.reply_seconds for t in done])) if done else None,
            "send_lag_ms": {"p99": float(np.percentile(lags, 99)) if lags else None,
                            "max": float(max(lags)) if lags else None},
            "wall_s": round(self.wall_s, 2), "settings": self.settings,
        }


# --- the clients ---------------------------------------------------------------------------------


def pcm16_chunks(audio: np.ndarray, chunk_samples: int) -> list[bytes]:
    """float32 audio as 16-bit little-endian PCM, cut into chunks of `chunk_samples`."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767).astype("<i2").tobytes()
    step = chunk_samples * 2
    return [pcm[i: i + step] for i in range(0, len(pcm), step)]


class _Dropped(Exception):
    """The session cannot go on (timeout, unexpected close); the message is the reason."""


@dataclass
class _SessionState:
    turn: TurnRecord | None = None
    closed: bool = False


def http_base(url: str) -> str:
    """ws://host:port/ws -> http://host:port (wss -> https)."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    return f"{'https' if scheme == 'wss' else 'http'}://{host}"


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is reached directly


def http_json(url: str, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with _OPENER.open(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def server_stats(url: str, token: str | None = None) -> dict[str, Any] | None:
    """The server's /stats (url: its ws:// or http:// address), or None when it does not answer."""
    try:
        return http_json(http_base(url) + "/stats", token)
    except (OSError, ValueError):
        return None


def process_rss_mb(pid: int | None) -> float | None:
    """Resident memory of process `pid` in MiB (VmRSS in /proc), or None."""
    return _proc_status_mb(pid, "VmRSS")


def process_peak_rss_mb(pid: int | None) -> float | None:
    return _proc_status_mb(pid, "VmHWM")


def _proc_status_mb(pid: int | None, key: str) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _Talker:
    """The shared plan of a run's clients: utterances (as chunks), voices, pacing, timeouts."""

    def __init__(self, url: str, utterances: Sequence[np.ndarray], token: str | None, speakers: Sequence[str],
                 emotions: Sequence[str], chunk_ms: int, realtime: bool, vad: str, listen: bool | None,
                 turn_timeout_s: float, trailing_silence_s: float, deflate: bool) -> None:
        if not utterances:
            raise LoadTestError("no utterances to send")
        if vad not in ("client", "server"):
            raise LoadTestError(f"vad {vad!r}: 'client' or 'server'")
        if chunk_ms < 1:
            raise LoadTestError("chunk_ms must be at least 1")
        self.url, self.token, self.vad = url, token, vad
        self.speakers, self.emotions = list(speakers) or list(SPEAKERS), list(emotions) or ["neutral"]
        self.chunk_samples = SAMPLE_RATE * chunk_ms // 1000
        self.chunk_s = self.chunk_samples / SAMPLE_RATE
        self.chunks = [pcm16_chunks(u, self.chunk_samples) for u in utterances]
        self.seconds = [len(u) / SAMPLE_RATE for u in utterances]
        self.silence = pcm16_chunks(np.zeros(int(trailing_silence_s * SAMPLE_RATE), np.float32), self.chunk_samples)
        self.realtime = realtime
        self.listen = realtime if listen is None else listen
        self.turn_timeout_s = turn_timeout_s
        self.deflate = deflate
        self.vad_grace_s = 2.0   # server VAD: how long after the trailing silence its end_of_utterance may take
        self.next_turn: dict[int, int] = collections.defaultdict(int)   # per client, across its sessions

    def voice(self, client: int, turn: int) -> tuple[str, str]:
        return (self.speakers[(client + turn) % len(self.speakers)],
                self.emotions[(client + turn) % len(self.emotions)])

    async def session(self, client: int, turns: int | None, should_stop: Callable[[], bool],
                      result: LoadResult) -> bool:
        """One WebSocket session of `client`: start, up to `turns` turns (None: until should_stop()),
        stop. Returns False when the session was dropped (recorded in result.dropped)."""
        import websockets

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        ws = None
        state = _SessionState()
        reader: asyncio.Task | None = None
        try:
            # as a browser: no client pings, no proxy; permessage-deflate only when asked for
            ws = await websockets.connect(self.url, additional_headers=headers, ping_interval=None, max_size=None,
                                          proxy=None,
                                          compression="deflate" if self.deflate else None,
                                          open_timeout=self.turn_timeout_s, close_timeout=5)
            result.sessions_opened += 1
            speaker, emotion = self.voice(client, self.next_turn[client])
            await ws.send(json.dumps({"type": "start", "protocol": 1, "speaker": speaker, "emotion": emotion,
                                      "sample_rate": SAMPLE_RATE, "vad": self.vad}))
            await asyncio.wait_for(self._ready(ws, client, result), self.turn_timeout_s)
            reader = asyncio.create_task(self._read(ws, client, state, result))
            done = 0
            while (turns is None or done < turns) and not should_stop():
                turn = self.next_turn[client]
                self.next_turn[client] += 1
                wanted = self.voice(client, turn)
                if wanted != (speaker, emotion):
                    speaker, emotion = wanted
                    await ws.send(json.dumps({"type": "voice", "speaker": speaker, "emotion": emotion}))
                await self._turn(ws, client, turn, state, result)
                done += 1
            await ws.send(STOP)
            try:
                await asyncio.wait_for(asyncio.shield(reader), self.turn_timeout_s)
            except asyncio.TimeoutError:
                raise _Dropped("no close after stop") from None
            if ws.close_code != 1000:
                raise _Dropped(f"closed {ws.close_code} after stop")
            return True
        except Exception as exc:  # noqa: BLE001 - every failure of a session is a dropped session
            if isinstance(exc, _Dropped):
                reason = str(exc)
            elif ws is not None and ws.close_code is not None:
                reason = f"closed {ws.close_code} {ws.close_reason}".strip()
            else:
                reason = f"{type(exc).__name__}: {exc}"[:200]
            result.dropped.append({"client": client, "reason": reason,
                                   "close_code": ws.close_code if ws is not None else None})
            return False
        finally:
            if reader is not None:
                reader.cancel()
            if ws is not None:
                await ws.close()

    async def _ready(self, ws: Any, client: int, result: LoadResult) -> None:
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                result.stray_frames += 1
                continue
            reply = json.loads(message)
            if reply.get("type") == "ready":
                return
            if reply.get("type") == "error":
                result.errors.append({"client": client, "turn": None, "code": reply.get("code"),
                                      "message": reply.get("message")})
                raise _Dropped(f"start refused: {reply.get('code')}")

    async def _read(self, ws: Any, client: int, state: _SessionState, result: LoadResult) -> None:
        """Every frame of the session, as it arrives: reply audio, end of utterance, reply_end, errors."""
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in ws:
                now = time.perf_counter()
                turn = state.turn
                if isinstance(message, bytes):
                    if turn is None or turn.eou_at is None or turn.done.is_set():
                        result.stray_frames += 1
                        continue
                    if turn.first_at is None:
                        turn.first_at = now
                    turn.samples += len(message) // 2
                    continue
                try:
                    reply = json.loads(message)
                    kind = reply.get("type")
                except (ValueError, AttributeError):
                    reply, kind = {"code": "client:invalid_frame", "message": message[:200]}, "error"
                if kind == "end_of_utterance":
                    if turn is not None and turn.eou_at is None:
                        turn.eou_at = now
                    if turn is not None:
                        turn.ended.set()
                elif kind == "reply_end":
                    if turn is not None and not turn.done.is_set():
                        turn.end_at, turn.server_metrics = now, reply.get("metrics") or {}
                        turn.done.set()
                    else:
                        result.stray_frames += 1
                elif kind == "error":
                    result.errors.append({"client": client, "turn": turn.turn if turn else None,
                                          "code": reply.get("code"), "message": reply.get("message")})
                    if turn is not None and not turn.done.is_set():
                        turn.error = str(reply.get("code"))
                        turn.done.set()
        except ConnectionClosed:
            pass
        finally:
            state.closed = True
            if state.turn is not None:
                state.turn.done.set()

    async def _turn(self, ws: Any, client: int, turn: int, state: _SessionState, result: LoadResult) -> None:
        index = (client + turn) % len(self.chunks)
        record = TurnRecord(client, turn, self.seconds[index])
        result.turns.append(record)
        state.turn = record
        await self._stream(ws, self.chunks[index], record, state)
        if self.vad == "client":
            record.eou_at = time.perf_counter()
            await ws.send(END_OF_UTTERANCE)
        else:  # silence until the server's VAD ends the utterance; if it does not, end it ourselves
            await self._stream(ws, self.silence, record, state, until=lambda: record.eou_at is not None)
            try:
                await asyncio.wait_for(record.ended.wait(), self.vad_grace_s)
            except asyncio.TimeoutError:
                pass
            if record.eou_at is None and not record.done.is_set():
                record.eou_at = time.perf_counter()
                await ws.send(END_OF_UTTERANCE)
        try:
            await asyncio.wait_for(record.done.wait(), self.turn_timeout_s)
        except asyncio.TimeoutError:
            raise _Dropped(f"no reply_end within {self.turn_timeout_s:g} s") from None
        if state.closed and not record.completed:
            raise _Dropped(f"closed {ws.close_code} {ws.close_reason or ''}".strip())
        if self.listen and record.completed and record.first_at is not None:
            # the caller listens to the reply before speaking again
            await asyncio.sleep(max(0.0, record.first_at + record.reply_seconds - time.perf_counter()))

    async def _stream(self, ws: Any, chunks: list[bytes], record: TurnRecord, state: _SessionState,
                      until: Callable[[], bool] | None = None) -> None:
        """Send `chunks`, each at its absolute deadline (chunk k once k+1 chunks were recorded)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        for k, chunk in enumerate(chunks):
            if until is not None and until():
                return
            if self.realtime:
                deadline = began + (k + 1) * self.chunk_s
                delay = deadline - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                record.send_lag_ms = max(record.send_lag_ms, (loop.time() - deadline) * 1000)
            if state.closed:
                raise _Dropped(f"closed {ws.close_code} {ws.close_reason or ''} while streaming".strip())
            await ws.send(chunk)


def _check_server(url: str) -> dict[str, Any]:
    try:
        config = http_json(http_base(url) + "/config")
    except (OSError, ValueError) as exc:
        raise LoadTestError(f"no server at {url}: {exc}") from exc
    if config.get("sample_rate") != SAMPLE_RATE:
        raise LoadTestError(f"the server streams at {config.get('sample_rate')} Hz; this client sends {SAMPLE_RATE}")
    return config


async def run_load(url: str, clients: int, turns: int, utterances: Sequence[np.ndarray], token: str | None = None,
                   *, speakers: Sequence[str] = SPEAKERS, emotions: Sequence[str] = EMOTIONS, chunk_ms: int = 20,
                   realtime: bool = True, start_spread_s: float | None = None, vad: str = "client",
                   listen: bool | None = None, turn_timeout_s: float = 120.0, trailing_silence_s: float = 1.5,
                   deflate: bool = False) -> LoadResult:
    """`clients` concurrent sessions of `turns` turns each against the server at `url` (ws://.../ws).

    Turn t of client c speaks utterances[(c + t) % n] (float32, 16 kHz) and asks for the voice
    speakers[(c + t) % len(speakers)], emotions[(c + t) % len(emotions)] (in `start`, then with
    `voice` messages). realtime: chunks are paced as a microphone sends them, and (listen, by
    default the same) the caller hears the reply out before speaking again; otherwise as fast as
    the socket takes them. Client c starts at c/clients of start_spread_s (default: the mean
    utterance length). vad="server": the utterance is followed by silence and the server's VAD
    ends it (the clock starts at its end_of_utterance message).
    """
    await asyncio.to_thread(_check_server, url)
    talker = _Talker(url, utterances, token, speakers, emotions, chunk_ms, realtime, vad, listen, turn_timeout_s,
                     trailing_silence_s, deflate)
    spread = float(np.mean(talker.seconds)) if start_spread_s is None else start_spread_s
    result = LoadResult(clients, turns, settings={"chunk_ms": chunk_ms, "realtime": realtime, "vad": vad,
                                                  "listen": talker.listen, "start_spread_s": round(spread, 3),
                                                  "utterances": len(utterances),
                                                  "utterance_s_mean": round(float(np.mean(talker.seconds)), 3)})

    async def client(index: int) -> None:
        await asyncio.sleep(spread * index / max(clients, 1))
        await talker.session(index, turns, lambda: False, result)

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    result.wall_s = time.perf_counter() - began
    return result


# --- soak ----------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    load: LoadResult
    seconds: float
    samples: list[dict[str, Any]]          # t_s, rss_mb, turns, errors, dropped, server_* over time
    server_pid: int | None = None

    def summary(self) -> dict[str, Any]:
        load = self.load.summary()
        rss = [s["rss_mb"] for s in self.samples if s.get("rss_mb") is not None]
        memory = ({"start": rss[0], "end": rss[-1], "max": max(rss), "growth": rss[-1] - rss[0],
                   "growth_pct": (rss[-1] - rss[0]) / rss[0] * 100 if rss[0] else None,
                   "peak_hwm": process_peak_rss_mb(self.server_pid)} if rss else None)
        done = self.load.completed
        half = len(done) // 2
        first = [t.first_audio_ms for t in done[:half] if t.first_audio_ms is not None]
        second = [t.first_audio_ms for t in done[half:] if t.first_audio_ms is not None]
        return {"seconds": round(self.seconds, 1), "clients": self.load.clients,
                "turns_completed": load["turns_completed"], "turns_failed": load["turns_failed"],
                "sessions_opened": load["sessions_opened"], "errors": load["errors"],
                "error_codes": load["error_codes"], "dropped": load["dropped"], "drop_reasons": load["drop_reasons"],
                "memory_mb": memory, "latency_ms": load["latency_ms"],
                "latency_p95_first_half_ms": describe(first)["p95"],
                "latency_p95_second_half_ms": describe(second)["p95"],
                "reply_rtf_median": load["reply_rtf_median"], "settings": load["settings"], "samples": self.samples}


async def soak(url: str, clients: int, seconds: float, utterances: Sequence[np.ndarray], token: str | None = None,
               *, speakers: Sequence[str] = SPEAKERS, emotions: Sequence[str] = EMOTIONS, chunk_ms: int = 20,
               realtime: bool = True, start_spread_s: float | None = None, vad: str = "client",
               listen: bool | None = None, turn_timeout_s: float = 120.0, turns_per_session: int = 10,
               sample_every_s: float = 30.0, server_pid: int | None = None,
               should_stop: Callable[[], bool] | None = None,
               on_sample: Callable[[dict[str, Any]], None] | None = None) -> SoakResult:
    """Keep `clients` callers talking for `seconds` (or until should_stop()): each holds sessions of
    `turns_per_session` turns and reconnects after each. The server's RSS (when server_pid is given)
    and /stats are sampled at the start, every sample_every_s and at the end (after the sessions
    closed), with the clients' turns, errors and dropped sessions so far."""
    await asyncio.to_thread(_check_server, url)
    talker = _Talker(url, utterances, token, speakers, emotions, chunk_ms, realtime, vad, listen, turn_timeout_s,
                     1.5, False)
    spread = float(np.mean(talker.seconds)) if start_spread_s is None else start_spread_s
    result = LoadResult(clients, None, settings={"chunk_ms": chunk_ms, "realtime": realtime, "vad": vad,
                                                 "listen": talker.listen, "start_spread_s": round(spread, 3),
                                                 "turns_per_session": turns_per_session,
                                                 "utterances": len(utterances)})
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + seconds
    stop = lambda: loop.time() >= deadline or (should_stop is not None and should_stop())  # noqa: E731
    samples: list[dict[str, Any]] = []

    async def sample() -> None:
        stats = await asyncio.to_thread(server_stats, url, token)
        point = {"t_s": round(loop.time() - began, 1), "rss_mb": process_rss_mb(server_pid),
                 "turns": len(result.completed), "errors": len(result.errors), "dropped": len(result.dropped),
                 "server_sessions": stats.get("sessions") if stats else None,
                 "server_errors_total": stats.get("errors_total") if stats else None,
                 "server_replies_total": stats.get("replies_total") if stats else None}
        samples.append(point)
        if on_sample is not None:
            on_sample(point)

    async def sampler() -> None:
        while True:
            await asyncio.sleep(max(0.0, min(sample_every_s, deadline - loop.time())))
            if stop():
                return
            await sample()

    async def client(index: int) -> None:
        await asyncio.sleep(spread * index / max(clients, 1))
        while not stop():
            if not await talker.session(index, turns_per_session, stop, result):
                await asyncio.sleep(1.0)  # no tight reconnect loop against a failing server

    await sample()
    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(client(i) for i in range(clients)))
    sampling.cancel()
    await _wait_idle(url, token, timeout=10.0)
    await sample()
    result.wall_s = loop.time() - began
    return SoakResult(result, result.wall_s, samples, server_pid)


async def _wait_idle(url: str, token: str | None, timeout: float) -> None:
    """Until the server holds no session and generates no reply (or `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = await asyncio.to_thread(server_stats, url, token)
        if stats is None or (stats.get("sessions") == 0 and not stats.get("replying")):
            return
        await asyncio.sleep(0.1)


# --- the server under test -------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`s2s serve` in a subprocess on a free port, ready (/healthz) on entry, stopped (SIGTERM, the
    graceful drain) on exit; its log goes to a file, whose tail is in the error if it fails."""

    def __init__(self, model: str | None, overrides: Sequence[str] = (), profile: str | None = None,
                 port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None,
                 startup_timeout_s: float = 180.0) -> None:
        self.host, self.port = host, port or free_port(host)
        self.command = [sys.executable, "-m", "s2s.cli", "serve", "--host", host, "--port", str(self.port)]
        if model:
            self.command += ["--model", model]
        if profile:
            self.command += ["--profile", profile]
        self.command += [f"--set={o}" for o in overrides]
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="s2s-loadtest-server-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "ServerProcess":
        with socket.socket() as probe:  # another server on the port would answer /healthz in our stead
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise LoadTestError(f"port {self.port} on {self.host} is taken: {exc.strerror}") from None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LoadTestError(f"the server exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if http_json(f"http://{self.host}:{self.port}/healthz", timeout=2).get("status") == "ok":
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise LoadTestError(f"the server did not answer /healthz within {self.startup_timeout_s:g} s:\n"
                            f"{self.log_tail()}")

    def __exit__(self, *exc: Any) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


# --- the report ------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, OS, Python and torch versions of this machine."""
    from importlib import metadata

    info: dict[str, Any] = {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                            "memory_gb": None, "os": platform.platform(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024 ** 2, 1)
    except (OSError, ValueError):
        pass
    try:
        info["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        info["torch"] = None
    return info


def _run(results: list[dict[str, Any]], sessions: int, batching: bool) -> dict[str, Any] | None:
    found = [r for r in results if r.get("clients") == sessions and r.get("batching") is batching]
    return found[-1] if found else None


def evaluate_goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals against the runs with batching on: met, missed or not measured."""
    goals = []

    def goal(name: str, run: dict[str, Any] | None, measured: Callable[[dict[str, Any]], tuple[str, bool]]) -> None:
        if run is None:
            goals.append({"goal": name, "measured": "not measured", "status": "not measured"})
            return
        text, met = measured(run)
        goals.append({"goal": name, "measured": text, "status": "met" if met else "missed"})

    def no_errors(run: dict[str, Any]) -> tuple[str, bool]:
        text = (f"{run['errors']} errors, {run['dropped']} dropped, "
                f"{run['turns_completed']}/{run['turns_planned']} turns")
        return text, run["errors"] == 0 and run["dropped"] == 0 and run["turns_completed"] == run["turns_planned"]

    def latency(key: str, limit: float) -> Callable[[dict[str, Any]], tuple[str, bool]]:
        def measured(run: dict[str, Any]) -> tuple[str, bool]:
            value = run["latency_ms"][key]
            return ("no completed turn", False) if value is None else (f"{value:.1f} ms", value < limit)
        return measured

    one, many = _run(results, 1, True), _run(results, GOAL_SESSIONS, True)
    goal(f"0 errors at {GOAL_SESSIONS} sessions", many, no_errors)
    goal("p95 < 150 ms at 1 session", one, latency("p95", 150.0))
    goal(f"p95 < 300 ms at {GOAL_SESSIONS} sessions", many, latency("p95", 300.0))
    goal("std < 20 ms at 1 session", one, latency("std", 20.0))
    return goals


def batching_ratio(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Latency with batching off / on at the largest session count measured both ways."""
    both = sorted({r["clients"] for r in results if r.get("batching") is False}
                  & {r["clients"] for r in results if r.get("batching") is True})
    if not both:
        return None
    sessions = both[-1]
    on, off = _run(results, sessions, True), _run(results, sessions, False)
    ratio = {"sessions": sessions}
    for key in ("p95", "mean"):
        a, b = on["latency_ms"][key], off["latency_ms"][key]
        ratio[f"{key}_on_ms"], ratio[f"{key}_off_ms"] = a, b
        ratio[f"{key}_ratio"] = b / a if a and b is not None else None
    rtf_on, rtf_off = on.get("reply_rtf_median"), off.get("reply_rtf_median")
    ratio["rtf_on"], ratio["rtf_off"] = rtf_on, rtf_off
    return ratio


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MiB"


def write_benchmarks(path: Path, results: list[dict[str, Any]], meta: dict[str, Any],
                     soak: dict[str, Any] | None = None) -> Path:
    """docs/benchmarks.md from the runs (`LoadResult.summary()` plus batching, server_rss_mb,
    server_stats), written atomically. meta: command, machine (machine_info()), model (the server's
    /stats model), serving (settings), started (ISO time), notes (list of lines)."""
    from core import atomic

    machine = meta.get("machine") or machine_info()
    model = meta.get("model") or {}
    lines = ["# Serving benchmarks", "",
             f"Written by `{meta.get('command', 's2s loadtest')}` on {meta.get('started') or _now()}. "
             "Do not edit this file by hand: run the command again.", "",
             "## Machine", "",
             "| cores | CPU | memory | OS | Python | torch |", "|---|---|---|---|---|---|",
             f"| {machine.get('cores')} | {machine.get('cpu')} | {machine.get('memory_gb')} GB | {machine.get('os')} "
             f"| {machine.get('python')} | {machine.get('torch')} |", "",
             "The load generator (one asyncio process) ran on the same machine as the server.", "",
             "## Model", "",
             f"- uri: `{model.get('uri')}`",
             f"- name / version: {model.get('model_name')} / {model.get('version')}",
             f"- git commit: {model.get('git_commit')}; corpus hash: {model.get('corpus_hash')}"]
    if meta.get("serving"):
        lines.append("- serving: " + ", ".join(f"{k}={v}" for k, v in meta["serving"].items()))
    settings = next((r.get("settings") for r in results if r.get("settings")), {}) or {}
    lines += ["", "## Load", "",
              f"Utterances: {meta.get('utterances') or 'user turns'}. Each session streams them as 16-bit PCM in "
              f"{settings.get('chunk_ms', 20)} ms chunks, "
              + ("paced in real time" if settings.get("realtime", True) else "as fast as the socket takes them")
              + f", ends each with end_of_utterance (VAD: {settings.get('vad', 'client')}) and reads the reply "
              "to reply_end" + (", listening to it before the next turn" if settings.get("listen") else "")
              + ". Client starts are staggered over "
              f"{settings.get('start_spread_s', '?')} s. Latency: on the client, end_of_utterance sent -> first "
              "reply audio frame received (ms); server p95: the same measured inside the server. RTF: reply audio "
              "seconds / wall seconds from end_of_utterance to reply_end (median). Client lag: how late the paced "
              "chunks left at worst (p99; a large value means the load generator itself was saturated).", "",
              "| sessions | batching | turns | errors | dropped | mean | p50 | p95 | p99 | std | reply RTF "
              "| server p95 | client lag p99 | server RSS |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lat = r["latency_ms"]
        planned = r["turns_planned"] if r.get("turns_planned") is not None else "?"
        mode = {True: "on", False: "off"}.get(r.get("batching"), "?")
        lines.append(f"| {r['clients']} | {mode} "
                     f"| {r['turns_completed']}/{planned} | {r['errors']} | {r['dropped']} | {_ms(lat['mean'])} "
                     f"| {_ms(lat['p50'])} | {_ms(lat['p95'])} | {_ms(lat['p99'])} | {_ms(lat['std'])} "
                     f"| {_num(r.get('reply_rtf_median'))} | {_ms(r.get('server_latency_ms', {}).get('p95'))} "
                     f"| {_ms((r.get('send_lag_ms') or {}).get('p99'))} | {_mb(r.get('server_rss_mb'))} |")
    problems = [(r, code, n) for r in results for code, n in {**r.get("error_codes", {}),
                                                               **r.get("drop_reasons", {})}.items()]
    if problems:
        lines += ["", "Errors and dropped sessions by cause:", ""]
        lines += [f"- {r['clients']} sessions, batching {'on' if r.get('batching') else 'off'}: {code} x{n}"
                  for r, code, n in problems]
    lines += ["", "## Goals", "", "| goal | measured | status |", "|---|---|---|"]
    for g in evaluate_goals(results):
        mark = {"met": "met", "missed": "**missed**"}.get(g["status"], g["status"])
        lines.append(f"| {g['goal']} | {g['measured']} | {mark} |")
    ratio = batching_ratio(results)
    lines += ["", "## Batching on vs off", ""]
    if ratio is None:
        lines.append("Not measured (no run with batching off at a session count also run with batching on).")
    else:
        lines += [f"At {ratio['sessions']} sessions (off / on: how many times longer callers wait without "
                  "cross-session batching):", "",
                  "| latency | batching on | batching off | off / on |", "|---|---:|---:|---:|",
                  f"| p95 | {_ms(ratio['p95_on_ms'])} ms | {_ms(ratio['p95_off_ms'])} ms | "
                  f"{_num(ratio['p95_ratio'])}x |",
                  f"| mean | {_ms(ratio['mean_on_ms'])} ms | {_ms(ratio['mean_off_ms'])} ms | "
                  f"{_num(ratio['mean_ratio'])}x |",
                  f"| reply RTF (median) | {_num(ratio['rtf_on'])} | {_num(ratio['rtf_off'])} | |"]
    lines += ["", "## Soak", ""]
    if not soak:
        lines.append("Not run (--soak-seconds 0).")
    else:
        memory = soak.get("memory_mb")
        lines += [f"{soak['clients']} sessions talking for {soak['seconds']:.0f} s (sessions of "
                  f"{soak['settings'].get('turns_per_session')} turns, reconnecting), on a freshly started server:", "",
                  "| figure | value |", "|---|---:|",
                  f"| turns completed | {soak['turns_completed']} |",
                  f"| sessions opened | {soak['sessions_opened']} |",
                  f"| errors | {soak['errors']} |", f"| dropped sessions | {soak['dropped']} |",
                  f"| latency p50 / p95 (ms) | {_ms(soak['latency_ms']['p50'])} / {_ms(soak['latency_ms']['p95'])} |",
                  f"| latency p95, first half / second half (ms) | {_ms(soak['latency_p95_first_half_ms'])} / "
                  f"{_ms(soak['latency_p95_second_half_ms'])} |"]
        if memory:
            growth_pct = memory.get("growth_pct")
            lines += [f"| server RSS start / end / max | {_mb(memory['start'])} / {_mb(memory['end'])} / "
                      f"{_mb(memory['max'])} |",
                      f"| RSS growth | {memory['growth']:+.1f} MiB"
                      + (f" ({growth_pct:+.1f} %)" if growth_pct is not None else "") + " |"]
        else:
            lines.append("| server RSS | not sampled (no server pid) |")
        problems = {**soak.get("error_codes", {}), **soak.get("drop_reasons", {})}
        if problems:
            lines += ["", "Errors and dropped sessions by cause: "
                      + "; ".join(f"{k} x{v}" for k, v in problems.items())]
        lines += ["", "Samples:", "", "| t (s) | server RSS | turns | errors | dropped | server sessions |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for s in soak.get("samples", []):
            lines.append(f"| {s['t_s']} | {_mb(s.get('rss_mb'))} | {s['turns']} | {s['errors']} | {s['dropped']} "
                         f"| {s.get('server_sessions') if s.get('server_sessions') is not None else '-'} |")
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    return atomic.write_text(Path(path), "\n".join(lines) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def print_results(console: Any, results: list[dict[str, Any]], soak: dict[str, Any] | None = None) -> None:
    """The runs (and the soak) as rich tables."""
    from rich.table import Table

    latency = Table(title="first-audio latency (ms, client side)")
    for column in ("sessions", "batching", "turns", "errors", "dropped", "mean", "p50", "p95", "p99", "std"):
        latency.add_column(column, justify="right")
    more = Table(title="replies and the server")
    for column in ("sessions", "batching", "min ms", "max ms", "reply RTF", "server p95 ms", "client lag p99 ms",
                   "server RSS MiB"):
        more.add_column(column, justify="right")
    for r in results:
        lat = r["latency_ms"]
        mode = {True: "on", False: "off"}.get(r.get("batching"), "?")
        latency.add_row(str(r["clients"]), mode, f"{r['turns_completed']}/{r['turns_planned']}",
                        str(r["errors"]) if not r["errors"] else f"[red]{r['errors']}[/]",
                        str(r["dropped"]) if not r["dropped"] else f"[red]{r['dropped']}[/]",
                        *(_ms(lat[k]) for k in ("mean", "p50", "p95", "p99", "std")))
        more.add_row(str(r["clients"]), mode, _ms(lat["min"]), _ms(lat["max"]), _num(r.get("reply_rtf_median")),
                     _ms(r.get("server_latency_ms", {}).get("p95")), _ms((r.get("send_lag_ms") or {}).get("p99")),
                     _num(r.get("server_rss_mb"), 1))
    if results:
        console.print(latency)
        console.print(more)
        goals = Table(title="Goals")
        for column in ("goal", "measured", "status"):
            goals.add_column(column)
        colour = {"met": "green", "missed": "red"}
        for g in evaluate_goals(results):
            goals.add_row(g["goal"], g["measured"], f"[{colour.get(g['status'], 'yellow')}]{g['status']}[/]")
        console.print(goals)
        ratio = batching_ratio(results)
        if ratio:
            console.print(f"batching off / on at {ratio['sessions']} sessions: p95 x{_num(ratio['p95_ratio'])}, "
                          f"mean x{_num(ratio['mean_ratio'])}")
    if soak:
        memory = soak.get("memory_mb") or {}
        console.print(f"soak: {soak['clients']} sessions, {soak['seconds']:.0f} s, {soak['turns_completed']} turns, "
                      f"{soak['errors']} errors, {soak['dropped']} dropped; RSS {_mb(memory.get('start'))} -> "
                      f"{_mb(memory.get('end'))} (max {_mb(memory.get('max'))})", soft_wrap=True)


# --- utterances ------------------------------------------------------------------------------------


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


def _session_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise LoadTestError(f"--sessions {text!r}: comma-separated numbers, e.g. 1,10,50,100") from None
    if not counts or min(counts) < 1:
        raise LoadTestError(f"--sessions {text!r}: at least one count, each at least 1")
    return counts


async def _measure(url: str, sessions: list[int], batching: bool | None, turns: int, utterances: list[np.ndarray],
                   speakers: list[str], emotions: list[str], token: str | None, pid: int | None,
                   options: dict[str, Any], console: Any) -> list[dict[str, Any]]:
    """A warm-up turn, then one run per session count against one server."""
    await run_load(url, 1, 1, utterances[:1], token, speakers=speakers, emotions=emotions, realtime=False,
                   turn_timeout_s=options.get("turn_timeout_s", 120.0))
    rows = []
    for count in sessions:
        await _wait_idle(url, token, timeout=30.0)
        before = await asyncio.to_thread(server_stats, url, token) or {}
        result = await run_load(url, count, turns, utterances, token, speakers=speakers, emotions=emotions,
                                **options)
        await _wait_idle(url, token, timeout=30.0)
        after = await asyncio.to_thread(server_stats, url, token) or {}
        row = result.summary()
        row["batching"] = after.get("batching", batching) if batching is None else batching
        row["server_rss_mb"] = process_rss_mb(pid)
        row["server_stats"] = after
        row["server_errors_delta"] = ((after.get("errors_total") or 0) - (before.get("errors_total") or 0)
                                      if after else None)
        rows.append(row)
        lat = row["latency_ms"]
        console.print(f"{count} sessions (batching {'on' if row['batching'] else 'off'}): "
                      f"{row['turns_completed']}/{row['turns_planned']} turns, {row['errors']} errors, "
                      f"{row['dropped']} dropped; latency p50 {_ms(lat['p50'])} p95 {_ms(lat['p95'])} ms, "
                      f"RTF {_num(row['reply_rtf_median'])}", soft_wrap=True)
    return rows


def run_suite(params: Any, *, model: str | None, url: str | None, server_pid: int | None, sessions: list[int],
              turns: int, compare_unbatched: int, soak_seconds: float, soak_sessions: int, soak_sample_every: float,
              turns_per_session: int, options: dict[str, Any], token: str | None, port: int | None,
              overrides: list[str], profile: str | None, utterance_count: int, console: Any,
              log_dir: Path | None = None, command: str | None = None) -> dict[str, Any]:
    """Everything `s2s loadtest` measures: runs with batching (and without), then the soak; returns
    the report ({meta, runs, goals, batching_ratio, soak})."""
    serving = params.serving
    utterances, speakers, emotions, source = load_utterances(params, utterance_count,
                                                             serving.max_utterance_seconds * 0.95)
    started = _now()
    described = (f"{len(utterances)} utterances: {source}, "
                 f"{np.mean([len(u) for u in utterances]) / SAMPLE_RATE:.2f} s on average")
    notes = []
    runs: list[dict[str, Any]] = []
    soak_summary = None
    needed = max([*sessions, compare_unbatched, soak_sessions if soak_seconds > 0 else 0])
    extra = list(overrides)
    if needed > serving.max_sessions:
        extra.append(f"serving.max_sessions={needed}")
        notes.append(f"serving.max_sessions raised to {needed} for the started servers")
    model_info: dict[str, Any] = {}

    def server(batching: bool, label: str) -> ServerProcess:
        log = (log_dir / f"loadtest-server-{label}.log") if log_dir else None
        return ServerProcess(model, [*extra, f"serving.batching={str(batching).lower()}"], profile, port,
                             serving.host, log)

    def remember_model(target: str) -> None:
        stats = server_stats(target, token) or {}
        model_info.update(stats.get("model") or {})

    if url:
        remember_model(url)
        runs += asyncio.run(_measure(url, sessions, None, turns, utterances, speakers, emotions, token, server_pid,
                                     options, console))
        if compare_unbatched:
            notes.append("--url: no run with batching off (a running server cannot be restarted by the load test)")
        if soak_seconds > 0:
            soak_summary = _soak(url, server_pid, soak_sessions, soak_seconds, soak_sample_every, turns_per_session,
                                 utterances, speakers, emotions, token, options, console)
    else:
        with server(True, "batched") as proc:
            remember_model(proc.url)
            runs += asyncio.run(_measure(proc.url, sessions, True, turns, utterances, speakers, emotions, token,
                                         proc.pid, options, console))
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
                                                         "min_reply_seconds", "threads", "max_sessions")}
    if url:
        serving_settings = {"url": url}
    meta = {"command": command or "s2s loadtest", "utterances": described, "started": started, "finished": _now(),
            "machine": machine_info(), "model": model_info,
            "serving": serving_settings, "notes": notes}
    return {"meta": meta, "runs": runs, "goals": evaluate_goals(runs), "batching_ratio": batching_ratio(runs),
            "soak": soak_summary}


def _soak(url: str, pid: int | None, clients: int, seconds: float, every: float, turns_per_session: int,
          utterances: list[np.ndarray], speakers: list[str], emotions: list[str], token: str | None,
          options: dict[str, Any], console: Any) -> dict[str, Any]:
    def show(point: dict[str, Any]) -> None:
        console.print(f"soak t={point['t_s']:.0f}s: RSS {_mb(point['rss_mb'])}, {point['turns']} turns, "
                      f"{point['errors']} errors, {point['dropped']} dropped", soft_wrap=True)

    result = asyncio.run(soak(url, clients, seconds, utterances, token, speakers=speakers, emotions=emotions,
                              turns_per_session=turns_per_session, sample_every_s=every, server_pid=pid,
                              on_sample=show, **{k: v for k, v in options.items() if k != "deflate"}))
    return result.summary()


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
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="params.yaml profile (smoke, production)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a parameter (also of the started "
                                                                  "servers): section.key=value (repeatable)"),
) -> None:
    """Load-test the /ws server: latency and errors at 1-100 sessions, batching on vs off, a soak;
    writes docs/benchmarks.md."""
    from rich.console import Console

    from core import atomic
    from core.config import ConfigError, load_params, parse_overrides

    console = Console()
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
               "turn_timeout_s": turn_timeout}
    try:
        report = run_suite(params, model=model, url=url, server_pid=server_pid, sessions=counts, turns=turns,
                           compare_unbatched=compare_unbatched, soak_seconds=soak_seconds, soak_sessions=soak_sessions,
                           soak_sample_every=soak_sample_every, turns_per_session=soak_turns_per_session,
                           options=options, token=token, port=port, overrides=list(set_ or []), profile=profile,
                           utterance_count=utterances, console=console,
                           log_dir=params.path(params.paths.artifacts), command=command)
    except LoadTestError as exc:
        fail(str(exc))
    print_results(console, report["runs"], report["soak"])
    write_benchmarks(out_path, report["runs"], report["meta"], report["soak"])
    atomic.write_json(json_path, report)
    console.print(f"report written to {out_path}; figures in {json_path}", soft_wrap=True)
    if strict and any(g["status"] == "missed" for g in report["goals"]):
        raise typer.Exit(code=1)


__all__ = ["LoadResult", "LoadTestError", "ServerProcess", "SoakResult", "TurnRecord", "batching_ratio", "describe",
           "evaluate_goals", "load_utterances", "loadtest_command", "machine_info", "print_results", "process_rss_mb",
           "run_load", "run_suite", "server_stats", "soak", "write_benchmarks"]
