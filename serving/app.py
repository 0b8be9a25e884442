"""The FastAPI app: /ws (streaming protocol v1, docs/protocol.md), /stats, /healthz, /metrics, and
the demo page at /.

Each WebSocket is one session: its socket handler parses and checks frames, the engine thread
(serving/engine.py) does all model work for every session in batches, and one sender task per
socket writes what the engine and the handler have to say, so a slow or misbehaving client only
ever delays itself. Bad input gets an error frame naming the problem (the session goes on) or,
for what cannot go on (wrong token, oversized message, too long a session), a close code and
reason.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, Info,
                               PlatformCollector, ProcessCollector, generate_latest)
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.websockets import WebSocketDisconnect, WebSocketState

from core.config import ServingConfig
from core.labels import EMOTIONS, SPEAKERS
from serving.bundle import ModelBundle, bundle_meta_summary, meta_sha, recorded_sampling
from serving.engine import Engine, ReplyEvent
from serving.host import memory_limit_bytes
from serving.precision import with_precision
from serving.session import GenerationSettings, SessionError, check_voice
from serving.vad import EndOfUtterance

PROTOCOL = 1
STATIC = Path(__file__).resolve().parent / "static"
# close codes (RFC 6455 and the IANA registry)
NORMAL, GOING_AWAY, POLICY, TOO_BIG, TRY_LATER = 1000, 1001, 1008, 1009, 1013


# First audio reaches seconds under load (docs/benchmarks.md: p99 ~7.5 s at 100 sessions with
# batching off), so the buckets go on past the 300 ms goal up to 30 s.
FIRST_AUDIO_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0,
                       15.0, 30.0)
TICK_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
GAP_TOLERANCE_S = 0.02  # a reply "has gaps" past one 20 ms frame of starvation in total


@dataclass
class Metrics:
    """Prometheus metrics in a registry of this app (several apps may live in one test process),
    with the process collectors (memory, CPU, file descriptors) that the default registry has."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.first_audio = Histogram("s2s_first_audio_seconds", "End of utterance to first reply audio",
                                     registry=self.registry, buckets=FIRST_AUDIO_BUCKETS)
        self.sessions = Gauge("s2s_sessions", "Live WebSocket sessions", registry=self.registry)
        self.replying = Gauge("s2s_replying_sessions", "Sessions whose reply is being generated",
                              registry=self.registry)
        self.errors = Counter("s2s_errors_total", "Error frames and refusals sent, by code", ["code"],
                              registry=self.registry)
        self.replies = Counter("s2s_replies_total", "Replies streamed to the end", registry=self.registry)
        self.model = Info("s2s_model", "The model this server serves", registry=self.registry)
        self.tick = Histogram("s2s_engine_tick_seconds", "Duration of an engine tick that did work",
                              registry=self.registry, buckets=TICK_BUCKETS)
        self.queue_depth = Gauge("s2s_engine_queue_depth", "Session commands waiting for the engine thread",
                                 registry=self.registry)
        self.waiting = Gauge("s2s_engine_waiting_replies", "Ended utterances whose reply has not started",
                             registry=self.registry)
        self.heartbeat_age = Gauge("s2s_engine_heartbeat_age_seconds",
                                   "Seconds since the engine loop last began a pass (grows when it is stuck)",
                                   registry=self.registry)
        self.memory_limit = Gauge("s2s_memory_limit_bytes", "Memory this process may use: the cgroup limit, "
                                  "else the machine's memory", registry=self.registry)
        self.memory_limit.set(memory_limit_bytes())
        self.engine_alive = Gauge("s2s_engine_alive", "1 while the engine thread runs", registry=self.registry)
        self.gap_seconds = Counter("s2s_playback_gap_seconds_total",
                                   "Seconds a real-time player starting at a reply's first frame would have "
                                   "starved, from the times the server sent the frames (network not included)",
                                   registry=self.registry)
        self.gap_replies = Counter("s2s_replies_with_gaps_total",
                                   f"Replies whose frames left the server late enough to starve such a player "
                                   f"for more than {GAP_TOLERANCE_S * 1000:g} ms in total", registry=self.registry)

    def watch(self, engine: Engine, model: dict[str, str]) -> None:
        """Read the engine's figures at each scrape, time its ticks, and label the model served."""
        self.model.info(model)
        engine.tick_observer = self.tick.observe
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.waiting.set_function(lambda: engine.waiting_replies)
        self.heartbeat_age.set_function(lambda: time.monotonic() - engine.heartbeat)
        self.engine_alive.set_function(lambda: float(engine.thread.is_alive()))


@dataclass
class PlayoutClock:
    """A real-time player fed by this socket: it starts at the reply's first frame and plays each
    frame for its duration; a frame sent after the player ran dry adds to the reply's gap."""

    started: float | None = None
    audio_s: float = 0.0
    starved_s: float = 0.0

    def sent(self, now: float, frame_s: float) -> None:
        if self.started is None:
            self.started = now
        late = now - (self.started + self.audio_s + self.starved_s)
        if late > 0:
            self.starved_s += late
        self.audio_s += frame_s


@dataclass
class ServerState:
    engine: Engine
    bundle: ModelBundle
    config: ServingConfig
    model_uri: str
    token: str | None
    metrics: Metrics = field(default_factory=Metrics)
    sockets: dict[str, WebSocket] = field(default_factory=dict)
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=5000))
    sessions_total: int = 0
    replies_total: int = 0
    errors_total: int = 0
    draining: bool = False
    started: float = field(default_factory=time.time)

    def stats(self) -> dict[str, Any]:
        values = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(0)
        latency = ({"count": int(len(values)), "mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
                    "p95": float(np.percentile(values, 95)), "std": float(values.std())}
                   if len(values) else {"count": 0})
        return {"protocol": PROTOCOL, "sessions": len(self.sockets), "replying": self.engine.replying,
                "sessions_total": self.sessions_total, "replies_total": self.replies_total,
                "errors_total": self.errors_total, "first_audio_latency_ms": latency,
                "model": {"uri": self.model_uri, **bundle_meta_summary(self.bundle.meta)},
                "batching": self.engine.batching, "max_sessions": self.config.max_sessions,
                "engine": self.engine.describe(),
                "uptime_s": round(time.time() - self.started, 1)}

    async def drain(self, grace: float) -> None:
        """Refuse new sessions (and answer /healthz 503, so a balancer routes elsewhere), let live
        sessions go on until they end or config.session_drain_s passes, then let replies in flight
        finish (up to `grace` s) and close the rest."""
        self.draining = True
        sessions_deadline = time.monotonic() + self.config.session_drain_s
        while self.sockets and time.monotonic() < sessions_deadline:
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + grace
        while self.engine.replying and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # let the senders flush the last frames
        for socket in list(self.sockets.values()):
            try:
                await socket.close(GOING_AWAY, "server shutting down")
            except RuntimeError:
                pass


def model_labels(meta: dict[str, Any], model_uri: str) -> dict[str, str]:
    """The s2s_model_info labels: registered name and version (from the bundle, else the URI),
    the bundle sha (the registry's `bundle_sha` tag) and where it was loaded from."""
    name, version = meta.get("model_name"), meta.get("registered_version") or meta.get("version")
    match = re.match(r"models:/([^/@]+)(?:/(\d+)|@(\w+))?", model_uri or "")
    if match:
        name = name or match.group(1)
        version = version or match.group(2) or match.group(3)
    sha = meta_sha(meta) if meta.get("sha256") else ""
    return {"name": str(name or "unknown"), "version": str(version or "unknown"), "bundle_sha": sha,
            "uri": model_uri or ""}


def _authorized(state: ServerState, headers: Any, query: Any) -> bool:
    if not state.token:
        return True
    given = query.get("token") or ""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:]
    return hmac.compare_digest(given.encode(), state.token.encode())


def create_app(bundle: ModelBundle, config: ServingConfig, model_uri: str = "") -> FastAPI:
    """The app around a loaded bundle; starts its engine thread at startup."""
    settings = GenerationSettings.from_params(config, recorded_sampling(bundle.meta))
    bundle = with_precision(bundle, config.precision)
    engine = Engine(bundle, settings, config.max_sessions, config.batching, config.threads,
                    ahead_ms=config.ahead_ms, encode_hops=config.encode_hops)
    state = ServerState(engine, bundle, config, model_uri, os.environ.get(config.token_env) or None)
    app = FastAPI(title="Telugu S2S", version=str(PROTOCOL))
    app.state.s2s = state
    state.metrics.watch(engine, model_labels(bundle.meta, model_uri))

    @app.on_event("startup")
    async def _start() -> None:
        engine.start()

    @app.on_event("shutdown")
    async def _stop() -> None:
        if not state.draining:
            await state.drain(0)
        engine.stop()

    @app.get("/healthz")
    async def healthz() -> Response:
        """200 while this server takes sessions; 503 while draining or once the engine thread has
        died, which is what takes a replica out of HAProxy's rotation (docs/scaling.md)."""
        alive = engine.thread.is_alive()
        status = "draining" if state.draining else "ok" if alive else "engine_dead"
        return JSONResponse({"status": status, "model": model_uri, "engine": alive},
                            status_code=200 if status == "ok" else 503)

    @app.get("/stats")
    async def stats(request: Request) -> Response:
        if not _authorized(state, request.headers, request.query_params):
            return JSONResponse({"error": "invalid or missing token"}, status_code=401)
        return JSONResponse(state.stats())

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.replying.set(engine.replying)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return JSONResponse({"error": "demo page not installed"}, status_code=404)
        return FileResponse(page)

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        path = (STATIC / name).resolve()
        if path.parent != STATIC or not path.is_file():
            return JSONResponse({"error": f"no such file: {name}"}, status_code=404)
        return FileResponse(path)

    @app.get("/config")
    async def page_config() -> dict[str, Any]:
        """What the demo page needs: sample rate, voices, protocol version."""
        return {"protocol": PROTOCOL, "sample_rate": bundle.sample_rate, "frame_samples": bundle.codec.hop_length,
                "speakers": list(SPEAKERS), "emotions": list(EMOTIONS), "token_required": bool(state.token)}

    @app.websocket("/ws")
    async def websocket(socket: WebSocket) -> None:
        await socket.accept()
        if not _authorized(state, socket.headers, socket.query_params):
            state.metrics.errors.labels("unauthorized").inc()
            await socket.close(POLICY, "invalid or missing token")
            return
        if state.draining:
            await socket.close(GOING_AWAY, "server shutting down")
            return
        if len(state.sockets) >= config.max_sessions:
            state.metrics.errors.labels("server_full").inc()
            await socket.close(TRY_LATER, f"server full: {config.max_sessions} sessions")
            return
        await SocketSession(state, socket).run()

    return app


class SocketSession:
    """One WebSocket: parses the client's frames and relays the engine's events."""

    def __init__(self, state: ServerState, socket: WebSocket) -> None:
        self.state, self.socket, self.config = state, socket, state.config
        self.id = uuid.uuid4().hex[:12]
        self.loop = asyncio.get_running_loop()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.conversation: int | None = None
        self.vad: EndOfUtterance | None = None
        self.replying = False
        self.playout = PlayoutClock()

    # --- outgoing ---------------------------------------------------------------------------

    def emit(self, event: ReplyEvent) -> None:
        """Called on the engine thread: hand the event to this socket's loop."""
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, event)

    def error(self, code: str, message: str) -> None:
        self.outbox.put_nowait({"type": "error", "code": code, "message": message})

    async def sender(self) -> None:
        while True:
            item = await self.outbox.get()
            if isinstance(item, ReplyEvent):
                if item.kind == "audio":
                    pcm = (np.clip(item.pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes()
                    await self.socket.send_bytes(pcm)
                    self.playout.sent(time.monotonic(), len(item.pcm) / self.state.bundle.sample_rate)
                    continue
                self._count_gaps()
                if item.kind == "end":
                    self.replying = False
                    self.state.replies_total += 1
                    self.state.metrics.replies.inc()
                    self.state.latencies_ms.append(item.metrics["first_audio_ms"])
                    self.state.metrics.first_audio.observe(item.metrics["first_audio_ms"] / 1000)
                    item = {"type": "reply_end", "metrics": item.metrics, "text": item.text}
                else:
                    self.replying = False
                    item = {"type": "error", "code": item.code, "message": item.message}
            if item.get("type") == "error":
                self.state.errors_total += 1
                self.state.metrics.errors.labels(item["code"]).inc()
            await self.socket.send_text(json.dumps(item))

    def _count_gaps(self) -> None:
        """At the end of a reply (or its error): its playback gap, then a fresh clock."""
        starved = self.playout.starved_s
        if starved > 0:
            self.state.metrics.gap_seconds.inc(starved)
        if starved > GAP_TOLERANCE_S:
            self.state.metrics.gap_replies.inc()
        self.playout = PlayoutClock()

    # --- incoming ---------------------------------------------------------------------------

    async def run(self) -> None:
        state = self.state
        state.sockets[self.id] = self.socket
        state.sessions_total += 1
        state.metrics.sessions.inc()
        sender = asyncio.create_task(self.sender())
        deadline = time.monotonic() + self.config.max_session_seconds
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    message = await asyncio.wait_for(self.socket.receive(), timeout=max(remaining, 0.001))
                except asyncio.TimeoutError:
                    await self._close(POLICY, f"session longer than {self.config.max_session_seconds:g} s")
                    break
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("bytes") is not None:
                    closed = await self._on_audio(message["bytes"])
                else:
                    closed = await self._on_text(message.get("text") or "")
                if closed:
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if self.conversation is not None:
                state.engine.close(self.conversation)
            await asyncio.sleep(0)  # let queued frames go out before the sender stops
            sender.cancel()
            state.sockets.pop(self.id, None)
            state.metrics.sessions.dec()

    async def _close(self, code: int, reason: str) -> None:
        if code != NORMAL:
            self.state.metrics.errors.labels(f"close_{code}").inc()
            self.state.errors_total += 1
        await self._flush()
        if self.socket.client_state == WebSocketState.CONNECTED:
            await self.socket.close(code, reason[:120])

    async def _flush(self) -> None:
        for _ in range(50):
            if self.outbox.empty():
                return
            await asyncio.sleep(0.01)

    async def _on_audio(self, data: bytes) -> bool:
        if len(data) > self.config.max_message_bytes:
            await self._close(TOO_BIG, f"message of {len(data)} bytes exceeds {self.config.max_message_bytes}")
            return True
        if self.conversation is None:
            self.error("not_started", "audio before start: send a start message first")
            return False
        if len(data) % 2:
            self.error("bad_audio", f"binary frame of {len(data)} bytes: 16-bit PCM needs an even number")
            return False
        pcm = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        self.state.engine.post_audio(self.conversation, pcm)
        if self.vad is not None and not self.replying and self.vad.feed(pcm):
            self._end_of_utterance("server")
        return False

    def _end_of_utterance(self, source: str) -> None:
        self.replying = True
        self.state.engine.post_end(self.conversation)
        self.outbox.put_nowait({"type": "end_of_utterance", "source": source})

    async def _on_text(self, text: str) -> bool:
        size = len(text.encode("utf-8"))
        if size > self.config.max_message_bytes:
            await self._close(TOO_BIG, f"message of {size} bytes exceeds {self.config.max_message_bytes}")
            return True
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            self.error("invalid_json", f"text frame is not JSON: {exc.msg} at character {exc.pos}")
            return False
        except RecursionError:
            self.error("invalid_json", "text frame is JSON nested too deeply")
            return False
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.error("invalid_message", "a control message is a JSON object with a string 'type'")
            return False
        kind = message["type"]
        if kind == "start":
            self._on_start(message)
        elif kind in ("end_of_utterance", "voice") and self.conversation is None:
            self.error("not_started", f"{kind} before start: send a start message first")
        elif kind == "end_of_utterance":
            if self.replying:
                self.error("busy", "a reply is still streaming: wait for reply_end")
            else:
                self._end_of_utterance("client")
        elif kind == "voice":
            try:
                self.state.engine.post_voice(self.conversation, str(message.get("speaker")),
                                             str(message.get("emotion")))
                self.outbox.put_nowait({"type": "voice", "speaker": message["speaker"], "emotion": message["emotion"]})
            except SessionError as exc:
                self.error(exc.code, str(exc))
        elif kind == "stop":
            await self._close(NORMAL, "bye")
            return True
        else:
            self.error("unknown_type", f"unknown message type {kind!r}: start, end_of_utterance, voice or stop")
        return False

    def _on_start(self, message: dict[str, Any]) -> None:
        sample_rate = self.state.bundle.sample_rate
        if self.conversation is not None:
            self.error("already_started", "this session has started already; use voice to change the voice")
            return
        protocol = message.get("protocol", PROTOCOL)
        if type(protocol) is not int or protocol != PROTOCOL:  # not bool: True == 1 in Python
            self.error("unsupported_protocol", f"protocol {protocol!r} is not served: use {PROTOCOL}")
            return
        if type(message.get("sample_rate")) is not int or message.get("sample_rate") != sample_rate:
            self.error("unsupported_sample_rate",
                       f"sample_rate {message.get('sample_rate')!r}: send 16-bit mono PCM at {sample_rate} Hz")
            return
        vad = message.get("vad", "client")
        if vad not in ("client", "server"):
            self.error("invalid_message", f"vad {vad!r}: 'client' or 'server'")
            return
        speaker, emotion = str(message.get("speaker", "female_young")), str(message.get("emotion", "neutral"))
        try:
            check_voice(speaker, emotion)
        except SessionError as exc:
            self.error(exc.code, str(exc))
            return
        self.conversation = self.state.engine.open(speaker, emotion, self.emit)
        if vad == "server":
            self.vad = EndOfUtterance(sample_rate, self.config.vad_silence_ms, self.config.vad_threshold_dbfs)
        self.outbox.put_nowait({"type": "ready", "protocol": PROTOCOL, "session": self.id, "sample_rate": sample_rate,
                                "frame_samples": self.state.bundle.codec.hop_length, "speaker": speaker,
                                "emotion": emotion, "vad": vad,
                                "model": bundle_meta_summary(self.state.bundle.meta) | {"uri": self.state.model_uri}})
