"""`s2s signoff demo` on a registered tiny model: a real recording of the demo page through one turn.

The tiny text-stream bundle is registered in a throwaway MLflow store (version 1, champion), the
project's data holds one test-split pair whose user turn is Telugu speech from espeak-ng, and the
command starts `s2s serve` with the version, drives the page in Chromium and writes the files.
Checked: the video is a webm with frames (ffprobe), the WAV is the reply the server ended with
(its duration is reply_end's reply_seconds), the text the page showed is in demo.json, the files
are MLflow artifacts of the version's run, and the executive summary links them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import soundfile as sf

from core.config import load_params

from .conftest import REPO, require_tool, speak

EVALUATION = {"gates": {"codec": {"passed": True}, "s2s": {"passed": True}},
              "metrics": {"codec": {"stoi": 0.8, "pesq_wb": 1.5}, "s2s": {"perplexity": 100.0}}}
# a random model seldom samples end-of-reply: max_reply_seconds ends its replies quickly
SERVING = ["serving.max_reply_seconds=1.0", "serving.vad_silence_ms=500"]


def _one_test_pair(root: Path) -> None:
    """data/ with one test-split pair: what `s2s flow data` writes, cut down to what the demo reads."""
    data = root / "data"
    (data / "segments").mkdir(parents=True)
    sf.write(data / "segments" / "user.wav", speak("నమస్కారం, ఈ రోజు వాతావరణం ఎలా ఉంది?", "female_young"),
             16000, subtype="PCM_16")
    pd.DataFrame([{"segment_id": "user", "path": "segments/user.wav", "split": "test"}]).to_csv(
        data / "manifest.csv", index=False)
    (data / "pairs.jsonl").write_text(json.dumps({"split": "test", "input_segment": "user",
                                                  "reply_speaker_id": 1, "reply_emotion_id": 1}) + "\n")


def _ffprobe(path: Path) -> dict:
    result = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_format", "-show_streams",
                             "-of", "json", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_signoff_demo_records_one_turn_of_the_page(project_root: Path, text_bundle_dir: Path):
    try:
        import playwright  # noqa: F401
    except ImportError:
        playwright = None
    require_tool("playwright", playwright is not None, "the dev extras install it")
    from tasks.release.demo_page import chromium_path

    require_tool("Chromium", chromium_path().is_file(), f"no browser at {chromium_path()}")
    require_tool("ffmpeg", shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None,
                 "Playwright's video encoder and the check")
    require_tool("espeak-ng", shutil.which("espeak-ng") is not None, "no test speech")
    from tasks.release.executive_summary import write_summary
    from tasks.release.registry import mlflow_client, register_bundle

    params = load_params("smoke", root=project_root)
    _one_test_pair(project_root)
    registered = register_bundle(text_bundle_dir, params, EVALUATION, {"profile": "smoke"})
    assert registered.version == "1"

    result = subprocess.run([sys.executable, "-m", "s2s.cli", "signoff", "demo", "--model", "models:/telugu-s2s/1",
                             *(f"--set={s}" for s in SERVING)], cwd=project_root, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "one turn recorded (male_mature / happy)" in result.stdout, result.stdout

    folder = project_root / "artifacts" / "signoff" / "demo"
    record = json.loads((folder / "demo.json").read_text())
    assert record["model"]["version"] == "1" and record["model"]["name"] == "telugu-s2s"
    assert record["voice"] == {"speaker": "male_mature", "emotion": "happy"}
    assert record["page"]["errors"] == [] and record["server_stats"]["errors_total"] == 0, record

    # the video: a webm whose one stream is video, with frames
    probe = _ffprobe(folder / "demo.webm")
    assert "webm" in probe["format"]["format_name"], probe["format"]
    (stream,) = probe["streams"]
    assert stream["codec_type"] == "video" and stream["codec_name"] in ("vp8", "vp9"), stream
    assert int(stream["nb_read_frames"]) > 10, stream
    assert (int(stream["width"]), int(stream["height"])) == (1100, 1300)

    # the reply audio: what the server said it sent, frame for frame
    reply = record["reply_end"]
    audio, rate = sf.read(folder / "reply.wav", dtype="int16")
    assert rate == 16000 and len(audio) == 320 * reply["metrics"]["frames"] > 0
    assert len(audio) / rate == pytest.approx(reply["metrics"]["reply_seconds"], abs=1e-6)
    assert audio.any(), "the reply is not silence"

    # the text the page showed is the reply's own (a text-stream model spells what it says)
    assert reply["text"], "the tiny text-stream model said no characters"
    assert record["page"]["reply_text"] == reply["text"]

    # MLflow artifacts of the version's run, and the executive summary links them
    client = mlflow_client(params)
    run_id = client.get_model_version("telugu-s2s", "1").run_id
    assert record["mlflow"] == {"run_id": run_id, "artifact_path": "signoff/demo"}
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "signoff/demo")}
    assert logged == {"demo.webm", "reply.wav", "demo.json"}
    markdown, _ = write_summary(params, "1", project_root / "EXECUTIVE_SUMMARY.md")
    assert "## Demo" in markdown and "(artifacts/signoff/demo/demo.webm)" in markdown, markdown
    assert record["page"]["reply_text"] in markdown
    summary = (project_root / "artifacts" / "signoff" / "telugu-s2s-v1-summary.md").read_text()
    assert "(demo/demo.webm)" in summary and "(demo/reply.wav)" in summary
