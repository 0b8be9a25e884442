"""Serving behind HAProxy: /healthz answers 503 when the engine thread is dead; `s2s serve-pool`
puts two `s2s serve` replicas behind HAProxy (leastconn: two sessions land on two replicas), and a
rolling restart (`s2s serve-pool roll`) moves both onto the model the path names now without
dropping the live sessions: a draining replica answers /healthz 503, still serves a full turn of
the session it holds, and the balancer sends new sessions to the other one meanwhile.

Real processes on loopback: the pool command (its replicas and HAProxy) and the roll command;
the test stops them (SIGTERM) whatever happens. About a minute of CPU here (4 server starts)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets

from serving.pool import health
from tasks.benchmarks.server_launcher import free_port

from .conftest import require_tool, speak
from .live_server import LiveServer
from .loopback_servers import stop_process
from .test_serving import one_turn

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def test_healthz_is_503_once_the_engine_thread_is_dead(bundle_dir: Path, one_thread):
    with LiveServer(bundle_dir, {}) as server:
        ok, body = server.get("/healthz")
        server.app.state.s2s.engine.stop()
        dead, dead_body = server.get("/healthz")
    assert ok == 200 and body["status"] == "ok"
    assert dead == 503 and dead_body == {**body, "status": "engine_dead", "engine": False}


def _versioned_copy(bundle_dir: Path, target: Path, version: str) -> Path:
    shutil.copytree(bundle_dir, target)
    meta = json.loads((target / "bundle.json").read_text())
    (target / "bundle.json").write_text(json.dumps({**meta, "version": version}))
    return target


def _wait_state(folder: Path, process: subprocess.Popen, status: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the pool exited: {process.stdout.read()}"
        path = folder / "pool.json"
        if path.is_file() and (state := json.loads(path.read_text()))["status"] == status:
            return state
        time.sleep(0.2)
    raise AssertionError(f"the pool did not become {status} within {timeout} s")


def test_two_replicas_behind_haproxy_roll_onto_a_new_model_without_dropping_sessions(
        bundle_dir: Path, tmp_path: Path, one_thread):
    require_tool("haproxy", HAPROXY is not None, "the balancer of `s2s serve-pool`")
    current = tmp_path / "champion"  # what the replicas serve: a stand-in for models:/name@champion
    current.symlink_to(_versioned_copy(bundle_dir, tmp_path / "v1", "1"))
    folder, port = tmp_path / "pool", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pool = subprocess.Popen(
        [sys.executable, "-m", "s2s.cli", "serve-pool", "start", "--replicas", "2", "--port", str(port),
         "--model", str(current), "--dir", str(folder), "--session-drain", "120",
         "--set=serving.max_reply_seconds=0.4", "--set=serving.min_reply_seconds=0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    speech = speak("నమస్కారం.")
    url = f"ws://127.0.0.1:{port}/ws"

    async def start(ws) -> dict:
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        return json.loads(await ws.recv())

    async def scenario() -> dict:
        async with websockets.connect(url) as a, websockets.connect(url) as b:
            ready_a, ready_b = await start(a), await start(b)
            first_a, first_b = await one_turn(a, speech), await one_turn(b, speech)
            per_replica = [_stats(r["port"])["sessions"] for r in state["replicas"]]
            roll = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "s2s.cli", "serve-pool", "roll", "--dir", str(folder), "--timeout", "600",
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            r1 = state["replicas"][0]["port"]
            deadline = time.monotonic() + 120
            while (code := (await asyncio.to_thread(health, "127.0.0.1", r1))[0]) != 503:
                assert time.monotonic() < deadline, "the roll did not start draining r1"
                await asyncio.sleep(0.1)
            draining_health = code
            # the session on the draining replica goes on: one of a and b is on r1
            during_a, during_b = await one_turn(a, speech), await one_turn(b, speech)
            async with websockets.connect(url) as c:  # a new session meanwhile: the other replica takes it
                ready_c = await start(c)
                during_c = await one_turn(c, speech)
                await c.send(json.dumps({"type": "stop"}))
            for ws in (a, b):
                await ws.send(json.dumps({"type": "stop"}))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 30)
                assert closed.value.rcvd.code == 1000, "closed by the client's stop, not by the drain"
            roll_out, _ = await asyncio.wait_for(roll.communicate(), 600)
            async with websockets.connect(url) as d:
                ready_d = await start(d)
                after_d = await one_turn(d, speech)
                await d.send(json.dumps({"type": "stop"}))
        return {"ready": [ready_a, ready_b, ready_c, ready_d], "turns": [first_a, first_b, during_a, during_b,
                                                                         during_c, after_d],
                "per_replica": per_replica, "draining_health": draining_health, "roll_code": roll.returncode,
                "roll_out": roll_out.decode()}

    try:
        state = _wait_state(folder, pool, "ready")
        assert (folder / "haproxy.cfg").read_text().count("balance leastconn") == 1
        current.unlink()  # a new champion: the roll must pick it up
        current.symlink_to(_versioned_copy(bundle_dir, tmp_path / "v2", "2"))
        result = asyncio.run(scenario())
    finally:
        stop_process(pool)
    final = json.loads((folder / "pool.json").read_text())
    assert result["per_replica"] == [1, 1], "leastconn: the second session went to the idle replica"
    assert result["draining_health"] == 503
    for samples, controls in result["turns"]:
        assert [c["type"] for c in controls] == ["end_of_utterance", "reply_end"] and samples > 0
    versions = [r["model"]["version"] for r in result["ready"]]
    assert versions[:3] == ["1", "1", "1"] and versions[3] == "2", "sessions started before the roll finished " \
                                                                   "kept v1; the new one gets v2"
    assert result["roll_code"] == 0, result["roll_out"]
    assert final["rolls"] == 1 and final["last_roll"]["ok"]
    assert [r["generation"] for r in final["replicas"]] == [2, 2]
    assert pool.returncode == 0 and final["status"] == "stopped"


def _stats(port: int) -> dict:
    from tasks.benchmarks.load_client import http_json

    return http_json(f"http://127.0.0.1:{port}/stats")
