"""`s2s serve-pool`: several `s2s serve` replicas behind HAProxy on one machine, and the rolling
restart that picks up a new champion without dropping a live session.

The pool process owns its children: N replicas (`s2s serve` on ports port+1.., each loading
serving.model, by default models:/telugu-s2s@champion) and HAProxy in front on `port`
(serving/haproxy.py). It writes its state to pool.json in its folder and answers:
- SIGHUP: a rolling restart, one replica at a time: HAProxy puts it in DRAIN (no new sessions),
  SIGTERM starts its drain (its /healthz answers 503; the sessions it holds go on until they end
  or serving.session_drain_s passes), then a new replica on the same port loads the model the
  alias names *now*, and HAProxy routes to it again once /healthz says ok. The other replicas
  take the new sessions meanwhile, so with 2 or more replicas nobody is refused or cut off.
- SIGTERM/SIGINT: every replica drains, then HAProxy stops.
- A replica that exits on its own (killed, out of memory) is started again on its port; HAProxy
  sends new sessions to the others meanwhile (pool.json counts the `restarts`).
`s2s serve-pool roll` sends the SIGHUP and waits for pool.json to report the roll.

On several machines the same pieces apply with HAProxy's `server` lines naming them
(docs/scaling.md, Serving).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import atomic
from serving.haproxy import HAProxyAdmin, haproxy_config

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PoolError(RuntimeError):
    pass


def health(host: str, port: int, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of a replica's /healthz; (0, {}) when nothing answers."""
    try:
        with _OPENER.open(f"http://{host}:{port}/healthz", timeout=timeout) as response:
            return response.status, json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read().decode())
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


@dataclass
class Replica:
    name: str
    port: int
    log: Path
    process: subprocess.Popen | None = None
    generation: int = 0  # how many times this slot was (re)started

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "port": self.port, "pid": self.process.pid if self.process else None,
                "log": str(self.log), "generation": self.generation}


@dataclass
class ReplicaPool:
    """N `s2s serve` replicas and HAProxy in front, started, rolled and stopped by this process."""

    folder: Path
    replicas: int
    serve_args: list[str]               # what every replica's `s2s serve` gets (--profile, --set, --model)
    host: str = "127.0.0.1"
    port: int = 8000
    session_seconds: float = 900.0
    max_sessions: int = 128             # per replica (serving.max_sessions): HAProxy queues past it
    drain_timeout_s: float = 960.0      # a replica still running this long after SIGTERM is killed
    startup_timeout_s: float = 300.0
    haproxy: str = "haproxy"
    slots: list[Replica] = field(default_factory=list)
    rolls: int = 0
    restarts: int = 0
    rolling: bool = False
    last_roll: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise PoolError(f"--replicas {self.replicas}: at least 1")
        self.folder.mkdir(parents=True, exist_ok=True)
        sock = self.folder / "haproxy-admin.sock"
        if len(str(sock)) > 100:  # unix socket paths are limited to ~108 bytes
            sock = Path(tempfile.mkdtemp(prefix="s2s-pool-")) / "admin.sock"
        self.admin = HAProxyAdmin(sock)
        self.slots = [Replica(f"r{i + 1}", self.port + i + 1, self.folder / f"r{i + 1}.log")
                      for i in range(self.replicas)]
        self.haproxy_process: subprocess.Popen | None = None

    # --- state ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    def write_state(self, status: str) -> None:
        atomic.write_json(self.folder / "pool.json", {
            "status": status, "pid": os.getpid(), "url": self.url, "admin_socket": str(self.admin.path),
            "replicas": [r.state() for r in self.slots], "rolls": self.rolls, "restarts": self.restarts,
            "rolling": self.rolling,
            "last_roll": self.last_roll})

    # --- replicas -------------------------------------------------------------------------------

    def _start_replica(self, replica: Replica) -> None:
        command = [sys.executable, "-m", "s2s.cli", "serve", "--host", "127.0.0.1", "--port", str(replica.port),
                   *self.serve_args]
        with open(replica.log, "ab") as log:
            replica.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
        replica.generation += 1

    def _wait_healthy(self, replica: Replica) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if replica.process.poll() is not None:
                raise PoolError(f"replica {replica.name} (port {replica.port}) exited with code "
                                f"{replica.process.returncode}; its log: {replica.log}\n{_tail(replica.log)}")
            if health("127.0.0.1", replica.port)[0] == 200:
                return
            time.sleep(0.25)
        raise PoolError(f"replica {replica.name} did not answer /healthz within {self.startup_timeout_s:g} s; "
                        f"its log: {replica.log}\n{_tail(replica.log)}")

    def _stop_replica(self, replica: Replica) -> None:
        """SIGTERM (the replica drains), then wait; killed only past drain_timeout_s."""
        process = replica.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.drain_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def _wait_balancer(self, name: str, statuses: tuple[str, ...], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        status = "?"
        while time.monotonic() < deadline:
            status = self.admin.servers().get(name, {}).get("status", "?")
            if status.split(" ")[0] in statuses:
                return
            time.sleep(0.1)
        raise PoolError(f"haproxy reports {name} as {status!r}, not {' or '.join(statuses)}, after {timeout:g} s")

    # --- the pool -------------------------------------------------------------------------------

    def start(self) -> None:
        self.write_state("starting")
        config = self.folder / "haproxy.cfg"
        servers = {r.name: ("127.0.0.1", r.port) for r in self.slots}
        atomic.write_text(config, haproxy_config(self.host, self.port, servers, self.admin.path, self.session_seconds,
                                                 self.max_sessions))
        checked = subprocess.run([self.haproxy, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
        if checked.returncode != 0:
            raise PoolError(f"haproxy refused {config}:\n{checked.stdout}{checked.stderr}")
        for replica in self.slots:  # start them all, then wait: they load the model side by side
            self._start_replica(replica)
        for replica in self.slots:
            self._wait_healthy(replica)
        self.admin.path.unlink(missing_ok=True)
        with open(self.folder / "haproxy.log", "ab") as log:
            self.haproxy_process = subprocess.Popen([self.haproxy, "-db", "-f", str(config)], stdout=log,
                                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.admin.path.exists():
            if self.haproxy_process.poll() is not None or time.monotonic() > deadline:
                raise PoolError(f"haproxy did not start: {_tail(self.folder / 'haproxy.log')}")
            time.sleep(0.05)
        for replica in self.slots:
            self._wait_balancer(replica.name, ("UP",))
        self.write_state("ready")

    def roll(self) -> dict[str, Any]:
        """Restart every replica in turn (see the module's docstring); returns what happened."""
        self.rolling = True
        self.write_state("rolling")
        started, steps = time.monotonic(), []
        try:
            for replica in self.slots:
                t0 = time.monotonic()
                self.admin.set_state(replica.name, "drain")
                self._stop_replica(replica)
                drained = time.monotonic() - t0
                self._start_replica(replica)
                self._wait_healthy(replica)
                self.admin.set_state(replica.name, "ready")
                self._wait_balancer(replica.name, ("UP",))
                steps.append({"replica": replica.name, "drain_s": round(drained, 1),
                              "restart_s": round(time.monotonic() - t0 - drained, 1),
                              "model": health("127.0.0.1", replica.port)[1].get("model")})
                self.write_state("rolling")
            self.rolls += 1
            self.last_roll = {"ok": True, "finished": time.time(), "seconds": round(time.monotonic() - started, 1),
                              "steps": steps}
        except (PoolError, OSError, RuntimeError) as exc:
            self.last_roll = {"ok": False, "finished": time.time(), "error": str(exc), "steps": steps}
        finally:
            self.rolling = False
            self.write_state("ready")
        return self.last_roll

    def revive(self) -> list[str]:
        """Start again every replica whose process ended without being told to; their names."""
        revived = []
        for replica in self.slots:
            if replica.process is not None and replica.process.poll() is not None:
                with open(replica.log, "ab") as log:
                    log.write(f"\n[serve-pool] replica exited with code {replica.process.returncode}: "
                              "starting it again\n".encode())
                self._start_replica(replica)
                self._wait_healthy(replica)
                self.restarts += 1
                revived.append(replica.name)
        if revived:
            self.write_state("ready")
        return revived

    def stop(self) -> None:
        self.write_state("stopping")
        threads = [threading.Thread(target=self._stop_replica, args=(r,)) for r in self.slots]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.haproxy_process is not None and self.haproxy_process.poll() is None:
            self.haproxy_process.terminate()
            self.haproxy_process.wait(10)
        self.write_state("stopped")

    def run(self) -> None:
        """Start, then serve until SIGTERM/SIGINT; SIGHUP rolls the replicas."""
        wanted: list[str] = []
        signal.signal(signal.SIGHUP, lambda *_: wanted.append("roll"))
        signal.signal(signal.SIGTERM, lambda *_: wanted.append("stop"))
        signal.signal(signal.SIGINT, lambda *_: wanted.append("stop"))
        try:
            self.start()
            while "stop" not in wanted:
                if "roll" in wanted:
                    wanted.remove("roll")
                    self.roll()
                    continue
                if self.haproxy_process.poll() is not None:
                    raise PoolError(f"haproxy exited: {_tail(self.folder / 'haproxy.log')}")
                try:
                    self.revive()
                except PoolError as exc:  # it will be tried again; the other replicas serve meanwhile
                    print(f"serve-pool: {exc}", file=sys.stderr, flush=True)
                time.sleep(0.2)
        finally:
            self.stop()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def request_roll(folder: Path, timeout: float) -> dict[str, Any]:
    """Ask the pool whose state is in `folder` to roll (SIGHUP) and wait for the result."""
    state_path = folder / "pool.json"
    if not state_path.is_file():
        raise PoolError(f"no pool state at {state_path}: start one with `s2s serve-pool start`")
    state = json.loads(state_path.read_text())
    if state["status"] not in ("ready", "rolling"):
        raise PoolError(f"the pool in {folder} is {state['status']}, not ready")
    before = state.get("last_roll")
    try:
        os.kill(state["pid"], signal.SIGHUP)
    except ProcessLookupError:
        raise PoolError(f"the pool process {state['pid']} is not running") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        state = json.loads(state_path.read_text())
        if not state["rolling"] and state.get("last_roll") != before:
            return state["last_roll"]
    raise PoolError(f"the roll did not finish within {timeout:g} s (live sessions may still be draining)")
