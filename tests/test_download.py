"""yt-dlp against a loopback HTTP server: good media, a 404, a dropped connection, a closed port."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from core import atomic
from core.config import load_params
from tasks.data.download import download_sources
from tasks.data.sources import Source, SourcesError, load_sources

from .conftest import REPO


class MediaServer:
    """Serves /good.wav whole, /drop.wav cut off mid-body, and counts requests per path."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path == "/good.wav":
                    self.send_response(200)
                    self.send_header("Content-Type", "audio/wav")
                    self.send_header("Content-Length", str(len(server.payload)))
                    self.end_headers()
                    self.wfile.write(server.payload)
                elif self.path == "/drop.wav":
                    self.send_response(200)
                    self.send_header("Content-Type", "audio/wav")
                    self.send_header("Content-Length", str(len(server.payload)))
                    self.end_headers()
                    self.wfile.write(server.payload[: len(server.payload) // 3])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    self.send_error(404, "no such media")

            do_HEAD = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "MediaServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def wav_bytes(tmp_path: Path) -> bytes:
    path = atomic.write_wav(tmp_path / "tone.wav", 0.3 * np.sin(np.linspace(0, 2000, 32000)), 16000)
    return path.read_bytes()


def test_download_good_failing_and_archive(tmp_path: Path, wav_bytes: bytes):
    cfg = load_params("smoke", {"download": {"retries": 1, "socket_timeout_s": 5}}, root=REPO).download
    with MediaServer(wav_bytes) as server:
        local = tmp_path / "local.wav"
        local.write_bytes(wav_bytes)
        sources = [
            Source(id="good", url=f"{server.url}/good.wav", licence="test"),
            Source(id="missing", url=f"{server.url}/missing.wav", licence="test"),
            Source(id="dropped", url=f"{server.url}/drop.wav", licence="test"),
            Source(id="unreachable", url=f"http://127.0.0.1:{_closed_port()}/x.wav", licence="test"),
            Source(id="file", url=local.as_uri(), licence="test"),
        ]
        out, archive = tmp_path / "downloads", tmp_path / "downloads" / "archive.txt"
        report = download_sources(sources, cfg, out, archive)

        got = {r.source_id: r for r in report.recordings}
        assert set(got) == {"good", "file"}, "the good items download while the others fail"
        assert got["good"].media_path.read_bytes() == wav_bytes
        failed = {f.source_id: f.error for f in report.failures}
        assert set(failed) == {"missing", "dropped", "unreachable"}
        assert "404" in failed["missing"]
        assert "refused" in failed["unreachable"].lower() or "connect" in failed["unreachable"].lower()
        assert failed["dropped"], "a dropped connection is reported"
        assert not list((out / "dropped").glob("*.wav")), "no half-written media is kept as a recording"

        good_hits = server.hits["/good.wav"]
        stat = got["good"].media_path.stat()
        again = download_sources(sources[:1], cfg, out, archive)
        # yt-dlp's generic extractor probes a direct URL once to learn its id; the archive then
        # stops the download: the file is not fetched or rewritten.
        assert server.hits["/good.wav"] <= good_hits + 1
        assert got["good"].media_path.stat().st_mtime_ns == stat.st_mtime_ns
        assert archive.read_text().count("generic good") == 1
        assert [r.source_id for r in again.recordings] == ["good"], "archived items stay in the corpus"


def test_sources_file_errors(tmp_path: Path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("sources: []\n")
    with pytest.raises(SourcesError, match="lists no sources"):
        load_sources(empty)
    with pytest.raises(SourcesError, match="does not exist"):
        load_sources(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - {id: a, url: 'file:///x', licence: x, emotion: angry}\n")
    with pytest.raises(SourcesError, match="unknown emotion 'angry'"):
        load_sources(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("sources:\n  - {id: a, url: 'file:///x', licence: x}\n  - {id: a, url: 'file:///y', licence: x}\n")
    with pytest.raises(SourcesError, match="duplicate source ids: a"):
        load_sources(dup)
