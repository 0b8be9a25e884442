"""The demo page (serving/static) in Chromium, driven through a turn the way a user does it: pick a
voice, Start, speak into the microphone, hear the reply. Shared by the page's test
(tests/test_demo_page.py) and the demo recording (`s2s signoff demo`), so the recording shows the
page exactly as the test checks it.

The microphone is Chromium's fake capture device playing a WAV file (looped); the reply audio is
taken off the page's own WebSocket (Playwright sees every frame the page receives), so what is kept
is what the page was sent to play. With `video_dir`, Playwright records the page as webm.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

MICROPHONE_RATE = 48000  # the fake microphone file's rate (Chromium resamples it to its device rate)
VIEWPORT = {"width": 1100, "height": 1300}


class DemoPageError(RuntimeError):
    """The page could not be driven (no browser, no Playwright, no ffmpeg for the video)."""


def chromium_path() -> Path:
    """Debian's chromium (scripts/setup.sh installs it), or $S2S_CHROMIUM."""
    return Path(os.environ.get("S2S_CHROMIUM", "/usr/bin/chromium"))


def write_microphone(path: Path, audio: np.ndarray, sample_rate: int, lead_s: float = 0.4,
                     tail_s: float = 1.5) -> Path:
    """A 16-bit mono WAV for Chromium's fake microphone: silence, the utterance at 0.7 of full
    scale, then enough silence for the server's VAD to end the turn. It loops; the page is half
    duplex, so the loop is not heard while the reply plays."""
    from scipy.signal import resample_poly

    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"the microphone needs mono audio, got shape {audio.shape}")
    if sample_rate != MICROPHONE_RATE:
        divisor = np.gcd(int(sample_rate), MICROPHONE_RATE)
        audio = resample_poly(audio, MICROPHONE_RATE // divisor, int(sample_rate) // divisor)
    audio = 0.7 * audio / max(float(np.abs(audio).max()), 1e-6)
    audio = np.concatenate([np.zeros(int(lead_s * MICROPHONE_RATE)), audio, np.zeros(int(tail_s * MICROPHONE_RATE))])
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio.astype(np.float32), MICROPHONE_RATE, subtype="PCM_16", format="WAV")
    return path


def ffmpeg_registry(folder: Path) -> Path:
    """A Playwright browser registry whose video encoder is Debian's ffmpeg.

    Playwright records video by piping frames to `<registry>/ffmpeg-<revision>/ffmpeg-linux`, a
    build `playwright install ffmpeg` downloads from Playwright's CDN, which this project does not
    reach. Debian's ffmpeg has what the recorder asks for (matroska input, libvpx-vp9), so a
    registry of our own (PLAYWRIGHT_BROWSERS_PATH) links to it; the browser is Debian's chromium,
    named by path, so the registry holds nothing else."""
    import playwright

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise DemoPageError("no ffmpeg on PATH: the video is encoded with it (scripts/setup.sh installs it)")
    browsers = json.loads((Path(playwright.__file__).parent / "driver" / "package" / "browsers.json").read_text())
    revision = next(b["revision"] for b in browsers["browsers"] if b["name"] == "ffmpeg")
    link = folder / f"ffmpeg-{revision}" / "ffmpeg-linux"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(ffmpeg)
    return folder


@dataclass
class Turn:
    """What the page's socket received for one turn: the reply frames (16-bit PCM) between the
    server's end_of_utterance and its reply_end, and the reply_end message."""
    frames: list[bytes] = field(default_factory=list)
    reply_end: dict[str, Any] | None = None

    def pcm(self) -> np.ndarray:
        return np.frombuffer(b"".join(self.frames), dtype="<i2")


class SocketTap:
    """Every frame the page receives on /ws, sorted into turns (Playwright's websocket events)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.turns: list[Turn] = []
        self._open: Turn | None = None

    def attach(self, socket: Any) -> None:
        if socket.url.split("?")[0].endswith("/ws"):
            socket.on("framereceived", self.on_frame)

    def on_frame(self, payload: str | bytes) -> None:
        if isinstance(payload, (bytes, bytearray)):
            if self._open is not None:
                self._open.frames.append(bytes(payload))
            return
        message = json.loads(payload)
        self.messages.append(message)
        if message.get("type") == "end_of_utterance":
            self._open = Turn()
            self.turns.append(self._open)
        elif message.get("type") == "reply_end" and self._open is not None:
            self._open.reply_end = message
            self._open = None

    def first(self, kind: str) -> dict[str, Any] | None:
        return next((m for m in self.messages if m.get("type") == kind), None)


class DemoPage:
    """Chromium on the demo page at `base_url`, its microphone playing `microphone` (a WAV from
    write_microphone). Use as a context manager; `page` is Playwright's Page for anything more.
    With `video_dir`, the page is recorded and `video` is the webm once the block has ended."""

    def __init__(self, base_url: str, microphone: Path, video_dir: Path | None = None,
                 viewport: dict[str, int] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.microphone = Path(microphone)
        self.video_dir = video_dir
        self.viewport = viewport or VIEWPORT
        self.tap = SocketTap()
        self.page_errors: list[str] = []
        self.video: Path | None = None
        self.browser_version = ""
        self._registry: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "DemoPage":
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise DemoPageError("Playwright is missing: the dev extras install it (make setup)") from None
        chromium = chromium_path()
        if not chromium.is_file():
            raise DemoPageError(f"no browser at {chromium} (Debian's chromium; or set S2S_CHROMIUM)")
        saved = os.environ.get("PLAYWRIGHT_BROWSERS_PATH")
        if self.video_dir is not None:  # the driver reads it once, at start
            self._registry = tempfile.TemporaryDirectory(prefix="s2s-playwright-")
            os.environ["PLAYWRIGHT_BROWSERS_PATH"] = str(ffmpeg_registry(Path(self._registry.name)))
        try:
            self._playwright = sync_playwright().start()
        finally:
            if saved is None:
                os.environ.pop("PLAYWRIGHT_BROWSERS_PATH", None)
            else:
                os.environ["PLAYWRIGHT_BROWSERS_PATH"] = saved
        try:
            self.browser = self._playwright.chromium.launch(
                executable_path=str(chromium), headless=True,
                args=["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                      f"--use-file-for-fake-audio-capture={self.microphone}",
                      "--autoplay-policy=no-user-gesture-required"])
            self.browser_version = self.browser.version
            video = {"record_video_dir": str(self.video_dir), "record_video_size": self.viewport} if self.video_dir else {}
            self.context = self.browser.new_context(viewport=self.viewport, **video)
            self.page = self.context.new_page()
        except BaseException:
            self._close()
            raise
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        self.page.on("websocket", self.tap.attach)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close()

    def _close(self) -> None:
        page = getattr(self, "page", None)
        try:
            if getattr(self, "context", None) is not None:
                self.context.close()  # finishes the video file
                if page is not None and page.video is not None:
                    self.video = Path(page.video.path())
            if getattr(self, "browser", None) is not None:
                self.browser.close()
        finally:
            self._playwright.stop()
            if self._registry is not None:
                self._registry.cleanup()

    # --- one turn, step by step -----------------------------------------------------------------

    def open(self, token: str | None = None) -> None:
        """Load the page; wait until it has the server's config (idle)."""
        self.page.goto(f"{self.base_url}/")
        self.page.wait_for_function("window.s2sDemo && window.s2sDemo.state === 'idle'", timeout=10_000)
        if token and self.page.locator("#token-row").is_visible():
            self.page.fill("#token", token)

    def choose(self, speaker: str, emotion: str) -> None:
        self.page.click(f"#speaker-{speaker}")
        self.page.click(f"#emotion-{emotion}")

    def start(self) -> None:
        """Start a session; returns once the server's `ready` set the voice."""
        self.page.click("#start")
        self.page.wait_for_function("window.s2sDemo.session !== null && window.s2sDemo.voice !== null",
                                    timeout=10_000)

    def wait_reply(self, timeout_s: float = 30.0) -> None:
        """The user's utterance ended (the server's VAD) and the whole reply arrived (reply_end)."""
        self.page.wait_for_function("window.s2sDemo.repliesDone >= 1", timeout=timeout_s * 1000)

    def wait_played(self, timeout_s: float = 20.0) -> None:
        """Every reply frame the page scheduled has played out."""
        self.page.wait_for_function(
            "window.s2sDemo.samplesScheduled > 0 && window.s2sDemo.samplesPlayed >= window.s2sDemo.samplesScheduled",
            timeout=timeout_s * 1000)

    def state(self) -> dict[str, Any]:
        """The page's counters (window.s2sDemo) as plain JSON."""
        return self.page.evaluate("JSON.parse(JSON.stringify(window.s2sDemo))")

    def reply_text_shown(self) -> str:
        return self.page.inner_text("#reply-text")

    def stop(self) -> list[dict[str, Any]]:
        """Stop the session; the page's error list after the close."""
        self.page.click("#stop")
        self.page.wait_for_function("window.s2sDemo.state === 'closed'", timeout=5_000)
        return self.page.evaluate("window.s2sDemo.errors")
