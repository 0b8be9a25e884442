"""Load client for the /ws server (docs/protocol.md): what `s2s loadtest` measures with.

`run_load` opens N concurrent WebSocket sessions from one asyncio loop, as N callers would: each
starts, then per turn streams a real user utterance (PCM16 at 16 kHz) in 20 ms chunks paced in
real time against absolute deadlines (a microphone does not drift), sends `end_of_utterance` and
reads the reply to `reply_end`. Client starts are staggered so that turns do not all align.

Measured on the client, per turn: the first-audio latency (from sending `end_of_utterance`, or from
receiving the server's `end_of_utterance` with server VAD, to the first binary frame), the reply's
length and its real-time factor (reply audio seconds / wall seconds from end of utterance to
`reply_end`), and its playback gap from the arrival time of every frame (tasks/benchmarks/playback:
the seconds a real-time player would have had nothing to play). With `think` (conversational
profile) a caller pauses for a drawn think time after each reply before speaking again. Per run: error frames, dropped sessions (an unexpected close, a timeout or an
exception), the server's /stats afterwards and its memory (RSS from /proc) when its pid is known.

`soak` keeps clients talking for a while (sessions of a few turns, reconnecting) and samples the
server's memory and errors over time. The server launcher, the report and the suite that runs it
all are tasks/benchmarks/server_launcher.py, load_report.py and loadtest.py.

Over 400 lines because the client is one protocol state machine (_Talker) with its figures;
splitting it would scatter the protocol's handling.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from core.labels import EMOTIONS, SPEAKERS
from tasks.benchmarks.playback import ThinkTime, playback_gap_s

SAMPLE_RATE = 16000
STOP = json.dumps({"type": "stop"})
END_OF_UTTERANCE = json.dumps({"type": "end_of_utterance"})


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
    arrivals: list[tuple[float, int]] = field(default_factory=list, repr=False)  # (time, samples) per frame
    gap_buffer_s: float = 0.0            # the jitter buffer of the player whose gaps are counted
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
                "error": self.error, "send_lag_ms": round(self.send_lag_ms, 2), "gap_s": self.gap_s}

    def playback_gap(self, buffer_s: float = 0.0) -> float | None:
        return playback_gap_s(self.arrivals, SAMPLE_RATE, buffer_s) if self.arrivals else None

    @property
    def gap_s(self) -> float | None:
        return self.playback_gap(self.gap_buffer_s)


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

    def playback_summary(self) -> dict[str, Any]:
        """Playback gaps of the completed replies: how many had any, the share, the gap seconds."""
        gaps = [g for g in (t.gap_s for t in self.completed) if g is not None]
        with_gap = sum(g > 0 for g in gaps)
        return {"replies": len(gaps), "with_gap": with_gap, "share_with_gap": with_gap / len(gaps) if gaps else None,
                "gap_s": describe(gaps), "gap_total_s": float(sum(gaps)),
                "buffer_ms": (self.turns[0].gap_buffer_s * 1000) if self.turns else 0.0}

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
            "playback": self.playback_summary(),
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
                 turn_timeout_s: float, trailing_silence_s: float, deflate: bool, think: ThinkTime | None = None,
                 playback_buffer_s: float = 0.0) -> None:
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
        self.think, self.playback_buffer_s = think, playback_buffer_s
        self.think_rng: dict[int, np.random.Generator] = {}

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
                    turn.arrivals.append((now, len(message) // 2))
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
        record.gap_buffer_s = self.playback_buffer_s
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
        if self.think is not None and record.completed:  # the conversational profile: a pause to think
            rng = self.think_rng.setdefault(client, self.think.generator(client))
            await asyncio.sleep(self.think.draw(rng))

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
                   deflate: bool = False, think: ThinkTime | None = None,
                   playback_buffer_ms: float = 0.0) -> LoadResult:
    """`clients` concurrent sessions of `turns` turns each against the server at `url` (ws://.../ws).

    Turn t of client c speaks utterances[(c + t) % n] (float32, 16 kHz) and asks for the voice
    speakers[(c + t) % len(speakers)], emotions[(c + t) % len(emotions)] (in `start`, then with
    `voice` messages). realtime: chunks are paced as a microphone sends them, and (listen, by
    default the same) the caller hears the reply out before speaking again; otherwise as fast as
    the socket takes them. Client c starts at c/clients of start_spread_s (default: the mean
    utterance length). vad="server": the utterance is followed by silence and the server's VAD
    ends it (the clock starts at its end_of_utterance message). think: the conversational profile's
    pause after each reply (None: back-to-back). playback_buffer_ms: the jitter buffer of the
    player whose gaps are counted (0: playback starts at the first frame).
    """
    await asyncio.to_thread(_check_server, url)
    talker = _Talker(url, utterances, token, speakers, emotions, chunk_ms, realtime, vad, listen, turn_timeout_s,
                     trailing_silence_s, deflate, think, playback_buffer_ms / 1000)
    spread = float(np.mean(talker.seconds)) if start_spread_s is None else start_spread_s
    result = LoadResult(clients, turns, settings={"chunk_ms": chunk_ms, "realtime": realtime, "vad": vad,
                                                  "listen": talker.listen, "start_spread_s": round(spread, 3),
                                                  "utterances": len(utterances),
                                                  "utterance_s_mean": round(float(np.mean(talker.seconds)), 3),
                                                  "profile": "conversational" if think else "back-to-back",
                                                  "think": think.describe() if think else None,
                                                  "playback_buffer_ms": playback_buffer_ms})

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
