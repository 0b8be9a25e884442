"""The app under uvicorn in a thread on a free loopback port, for the serving tests."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import uvicorn

from core.config import load_params
from serving.bundle import load_bundle
from tasks.benchmarks.server_launcher import free_port


class LiveServer:
    """The app under uvicorn in a thread on a free loopback port (ws_max_size as `s2s serve` sets it)."""

    def __init__(self, bundle_dir: Path, serving: dict) -> None:
        from serving.app import create_app

        params = load_params("smoke", {"serving": serving})
        self.config = params.serving
        self.app = create_app(load_bundle(bundle_dir), params.serving, str(bundle_dir))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning",
            ws_max_size=max(params.serving.max_message_bytes * 2, 1 << 16)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def text(self, path: str, token: str | None = None) -> tuple[int, str]:
        """(status, body) of a GET on loopback (no proxy)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def get(self, path: str, token: str | None = None) -> tuple[int, dict]:
        """(status, JSON body) of a GET."""
        status, body = self.text(path, token)
        return status, json.loads(body)
