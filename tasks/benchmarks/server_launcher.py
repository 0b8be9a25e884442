"""The server under load: `s2s serve` in a subprocess on a free port, started and stopped the way
production does it (ready on /healthz, stopped with SIGTERM and its graceful drain), so the load
test measures the real server process rather than an app inside the test's own process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from tasks.benchmarks.load_client import LoadTestError, http_json


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
