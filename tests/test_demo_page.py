"""The demo page (serving/static) in headless Chromium through a whole turn.

Chromium's fake microphone plays a WAV file (Telugu speech from espeak-ng, then silence, looped);
the page captures it through its AudioWorklet resampler and streams it to the app (running on
loopback with a tiny random model); the server's VAD ends the utterance, the reply streams back
and the page schedules it for playback. The test checks what the page counted and showed, the
server's /stats, and that no error frame came back. A screenshot lands in the test's tmp folder
(and in $S2S_SCREENSHOT_DIR when set). The browser harness is tasks/release/demo_page.py, which the
demo recording (`s2s signoff demo`, tests/test_demo_recording.py) drives the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from core.config import load_params
from serving.app import create_app
from serving.bundle import load_bundle
from tasks.release.demo_page import MICROPHONE_RATE, DemoPage, chromium_path, write_microphone

from .conftest import REPO, require_tool, speak


@pytest.fixture()
def server(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """The app under uvicorn in a thread, on a free loopback port; yields its base URL."""
    import uvicorn

    monkeypatch.delenv("S2S_API_TOKEN", raising=False)
    # a random model seldom samples end-of-reply: max_reply_seconds ends its replies quickly
    overrides = {"serving": {"max_reply_seconds": 1.0, "vad_silence_ms": 500}}
    config = load_params("smoke", overrides, root=REPO).serving
    app = create_app(load_bundle(bundle_dir), config, "tiny-test-bundle")
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it Nagle's algorithm
    # and delayed ACKs hold each reply back ~40 ms
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws_max_size=1 << 17, lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture()
def fake_microphone(tmp_path: Path) -> Path:
    """16-bit mono WAV: 0.4 s of silence, a Telugu sentence, 1.5 s of silence (the VAD's cue)."""
    require_tool("espeak-ng", shutil.which("espeak-ng") is not None, "no test speech")
    speech = speak("నమస్కారం, ఈ రోజు వాతావరణం ఎలా ఉంది?", "female_young", sample_rate=MICROPHONE_RATE)
    return write_microphone(tmp_path / "fake-mic.wav", speech, MICROPHONE_RATE)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_demo_page_streams_a_spoken_reply(server: str, fake_microphone: Path, tmp_path: Path):
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
    require_tool("playwright", sync_api is not None, "the dev extras install it")
    require_tool("Chromium", chromium_path().is_file(),
                 f"no browser at {chromium_path()} (Debian's chromium; or set S2S_CHROMIUM)")
    assert get_json(f"{server}/config")["sample_rate"] == 16000

    with DemoPage(server, fake_microphone) as demo_page:
        page = demo_page.page
        demo_page.open()
        assert "తెలుగు" in page.title()
        assert page.locator("#speakers [role=radio]").count() == 4
        assert page.locator("#emotions [role=radio]").count() == 9
        assert page.locator("#token-row").is_hidden(), "this server needs no token"

        demo_page.choose("male_mature", "happy")
        assert page.get_attribute("#emotion-happy", "aria-checked") == "true"
        assert page.get_attribute("#emotion-neutral", "aria-checked") == "false"
        demo_page.start()
        assert page.evaluate("window.s2sDemo.voice") == {"speaker": "male_mature", "emotion": "happy"}

        # speech, silence, the server's VAD ends the turn, the reply streams back
        demo_page.wait_reply()
        page.click("#emotion-empathy")  # mid-session: a voice message, acknowledged
        page.wait_for_function("window.s2sDemo.voice.emotion === 'empathy'", timeout=5_000)
        # played means the AudioBufferSourceNodes ended; /stats is polled every 2 s
        page.wait_for_function("window.s2sDemo.samplesPlayed > 0", timeout=10_000)
        page.wait_for_function("Number(document.getElementById('stats-replies').textContent) >= 1",
                               timeout=5_000)
        demo = demo_page.state()
        stats = get_json(f"{server}/stats")
        metrics_text = page.inner_text("#metrics")
        first_audio_text = page.inner_text("#metric-first-audio")
        page.screenshot(path=str(tmp_path / "demo-page.png"), full_page=True)
        if os.environ.get("S2S_SCREENSHOT_DIR"):
            folder = Path(os.environ["S2S_SCREENSHOT_DIR"])
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "demo-page.png", folder / "demo-page.png")
        errors_after_stop = demo_page.stop()
    page_errors = demo_page.page_errors

    assert demo["errors"] == [] and errors_after_stop == [], f"error frames: {errors_after_stop}"
    assert page_errors == [], f"uncaught errors in the page: {page_errors}"
    assert demo["chunksSent"] > 50 and demo["samplesSent"] == 320 * demo["chunksSent"], demo
    reply = demo["lastReplyMetrics"]
    assert demo["framesReceived"] >= reply["frames"] > 0
    assert demo["samplesScheduled"] >= 320 * reply["frames"]
    assert 0 < demo["samplesPlayed"] <= demo["samplesScheduled"]
    assert demo["lastFirstAudioMs"] is not None and 0 <= demo["lastFirstAudioMs"] < 5000
    assert re.fullmatch(r"\d+(\.\d)? ms", first_audio_text), first_audio_text
    assert "Reply length" in metrics_text and re.search(r"\d\.\d\d s", metrics_text), metrics_text
    assert stats["replies_total"] >= 1 and stats["errors_total"] == 0, stats
    assert stats["first_audio_latency_ms"]["count"] >= 1
    # the harness's own tap saw the same reply the page counted
    turn = demo_page.tap.turns[0]
    assert turn.reply_end["metrics"]["frames"] == reply["frames"] == len(turn.frames)
