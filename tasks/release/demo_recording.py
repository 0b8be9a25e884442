"""The demo recording (`s2s signoff demo`): the demo page through one turn, as a reviewer would see
and hear it, kept beside a version's sign-off report.

`s2s serve` starts on 127.0.0.1 with the model (a subprocess, as in production), Chromium opens the
page with the first test-split user turn as its microphone (the latency gate's first turn, with
its pair's reply voice), and the page harness the page test uses (tasks/release/demo_page.py)
drives it through one turn while Playwright records it. What is kept, in artifacts/signoff/demo/
(swapped in whole) and as MLflow artifacts `signoff/demo/` of the version's run:
- demo.webm: the page, recorded (video only: a headless browser has no sound card);
- reply.wav: the reply audio exactly as the page received it to play (the frames on its socket);
- demo.json: the model, the voice, what the page showed (reply text, first audio) and the server's
  reply_end figures, so the three files can be checked against each other.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import soundfile as sf

from core import atomic
from core.config import Params
from core.hashing import file_sha256
from core.tracking import tracking_uri
from serving.server import registered_version
from tasks.benchmarks.load_client import http_json
from tasks.benchmarks.server_launcher import ServerProcess
from tasks.evaluation.latency import user_turns
from tasks.release.demo_page import DemoPage, write_microphone
from tasks.release.registry import mlflow_client

FILES = ("demo.webm", "reply.wav", "demo.json")
ARTIFACT_PATH = "signoff/demo"


def demo_dir(params: Params) -> Path:
    return params.path(params.paths.artifacts) / "signoff" / "demo"


def record_demo(params: Params, model: str | None = None, overrides: Sequence[str] = (),
                profile: str | None = None) -> dict[str, Any]:
    """Record one turn of the demo page against `model` (default: serving.model, the champion);
    write the three files and log them to the version's MLflow run. Returns demo.json's content."""
    uri = model or params.serving.model
    audio, speaker, emotion = user_turns(params, 1)[0]
    sample_rate = params.normalize.sample_rate  # the corpus segments' rate
    with tempfile.TemporaryDirectory(prefix="s2s-demo-") as tmp:
        work = Path(tmp)
        microphone = write_microphone(work / "microphone.wav", audio, sample_rate)
        with ServerProcess(uri, overrides, profile, log_path=work / "server.log") as server:
            base = f"http://{server.host}:{server.port}"
            with DemoPage(base, microphone, video_dir=work / "video") as page:
                page.open(token=os.environ.get("S2S_API_TOKEN"))
                page.choose(speaker, emotion)
                page.start()
                page.wait_reply(timeout_s=params.serving.max_reply_seconds + 60)
                page.wait_played(timeout_s=params.serving.max_reply_seconds + 20)
                shown = page.reply_text_shown()
                state = page.state()
                errors = page.stop()
                stats = http_json(f"{base}/stats", os.environ.get("S2S_API_TOKEN"))
        turn = page.tap.turns[0] if page.tap.turns else None
        problems = [*(f"{e['code']}: {e['message']}" for e in errors), *page.page_errors]
        if turn is None or turn.reply_end is None or not turn.frames:
            problems.append("no complete reply reached the page")
        if problems or page.video is None:
            raise RuntimeError(f"the demo turn failed: {'; '.join(problems) or 'no video was written'}")

        ready = page.tap.first("ready") or {}
        pcm = turn.pcm()
        rate = int(ready.get("sample_rate", sample_rate))
        version = registered_version(uri, tracking_uri(params.root, params.mlflow.tracking_uri))
        run_id = _run_id(params, version) if version else None
        record = {
            "recorded_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"uri": uri, "name": params.registry.model_name if version else None, "version": version,
                      "bundle": {k: v for k, v in (ready.get("model") or {}).items() if k != "uri"}},
            "voice": {"speaker": speaker, "emotion": emotion},
            "user_turn": {"source": "first test-split user turn (data/pairs.jsonl), as the latency gate's first",
                          "seconds": round(len(audio) / sample_rate, 3)},
            "page": {"reply_text": shown, "first_audio_ms": state.get("lastFirstAudioMs"),
                     "frames_received": state.get("framesReceived"), "underruns": state.get("underruns"),
                     "samples_played": state.get("samplesPlayed"), "errors": errors},
            "reply_end": turn.reply_end,
            "reply_audio": {"file": "reply.wav", "sample_rate": rate, "seconds": round(len(pcm) / rate, 4),
                            "frames": len(turn.frames)},
            "video": {"file": "demo.webm", "viewport": page.viewport, "browser": f"Chromium {page.browser_version}"},
            "server_stats": {k: stats.get(k) for k in ("replies_total", "errors_total", "first_audio_latency_ms")},
            "mlflow": {"run_id": run_id, "artifact_path": ARTIFACT_PATH} if run_id else None,
        }
        target = demo_dir(params)
        with atomic.atomic_dir(target) as staging:
            shutil.copyfile(page.video, staging / "demo.webm")
            sf.write(staging / "reply.wav", pcm, rate, subtype="PCM_16", format="WAV")
            record["sha256"] = {name: file_sha256(staging / name) for name in ("demo.webm", "reply.wav")}
            atomic.write_json(staging / "demo.json", record)
    if run_id:
        log_to_run(params, run_id, target)
    return record


def _run_id(params: Params, version: str) -> str:
    return mlflow_client(params).get_model_version(params.registry.model_name, version).run_id


def log_to_run(params: Params, run_id: str, folder: Path) -> None:
    """The three files as MLflow artifacts `signoff/demo/` of the run that registered the version."""
    client = mlflow_client(params)
    for name in FILES:
        client.log_artifact(run_id, str(folder / name), ARTIFACT_PATH)


def recorded_demo(params: Params, name: str, version: str) -> dict[str, Any] | None:
    """demo.json of the recording in artifacts/signoff/demo when it shows this version, else None."""
    path = demo_dir(params) / "demo.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    model = record.get("model") or {}
    if model.get("name") != name or str(model.get("version")) != str(version):
        return None
    if not all((path.parent / f).is_file() for f in FILES):
        return None
    return record
