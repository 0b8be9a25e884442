"""Training tasks on a tiny corpus: exact resume after a kill, DDP on 2 CPU processes, S2S."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from s2s.config import load_params
from tasks import atomic

from .conftest import speak

SENTENCES = [
    "ఈ రోజు వాతావరణం చాలా బాగుంది కదా?", "అవును, చల్లని గాలి వీస్తోంది.",
    "నువ్వు ఈ రోజు ఏమి తిన్నావు?", "నేను అన్నం, పప్పు తిన్నాను.",
    "మన ఊరికి బస్సు ఎప్పుడు వస్తుంది?", "సాయంత్రం ఐదు గంటలకు వస్తుంది.",
]
TINY = {  # a model small enough to train in seconds on the CPU
    "codec": {"n_codebooks": 2, "codebook_size": 32, "mel": {"vocoder_dim": 16, "vocoder_layers": 1},
              "conv": {"channels": 8, "latent_dim": 16}},
    "codec_train": {"batch_size": 2, "crop_seconds": 0.4, "log_every": 1, "checkpoint_every": 4, "eval_items": 2,
                    "max_steps": 40, "kmeans_iterations": 3, "unseen_items": 2},
    "s2s": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_len": 256},
    "s2s_train": {"batch_size": 2, "log_every": 1, "checkpoint_every": 4, "max_steps": 6, "warmup_steps": 2,
                  "max_turn_frames": 60},
    "evaluation": {"threads": 1, "asr": {"channels": 16, "hidden": 16, "layers": 1, "batch_size": 4, "max_steps": 4},
                   "classifier": {"channels": 8, "batch_size": 4, "max_steps": 4, "crop_seconds": 0.5},
                   "corpus_items": 2, "reply_inputs": 1, "max_reply_seconds": 0.3, "mos": ["distillmos"]},
}


@pytest.fixture()
def tiny_corpus(project_root: Path) -> Path:
    """data/ as the data flow writes it: 3 sources (one per split), 6 segments each, pairs."""
    data = project_root / "data"
    rows, pairs = [], []
    for split, source in (("train", "s1"), ("val", "s2"), ("test", "s3")):
        for i, text in enumerate(SENTENCES):
            speaker, emotion = ("male_young", "female_young")[i % 2], ("neutral", "happy")[i % 2]
            sid = f"{source}--{i:04d}"
            path = f"segments/{source}/{sid}.wav"
            atomic.write_wav(data / path, speak(text, speaker, emotion), 16000)
            rows.append({"segment_id": sid, "path": path, "split": split, "source_id": source, "recording_id": source,
                         "start": i * 3.0, "end": i * 3.0 + 2.0, "speaker": speaker, "emotion": emotion,
                         "text": text})
            if i % 2 == 1:
                pairs.append({"pair_id": f"{source}--{i - 1:04d}>{i:04d}", "recording_id": source,
                              "input_segment": f"{source}--{i - 1:04d}",
                              "reply_segment": sid, "split": split, "reply_speaker": speaker,
                              "reply_speaker_id": 2, "reply_emotion": emotion, "reply_emotion_id": 1})
    pd.DataFrame(rows).to_csv(data / "manifest.csv", index=False)
    (data / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return data


def _sets(overrides: dict, prefix: str = "") -> list[str]:
    """--set=a.b.c=value for every leaf of a nested override dict (JSON values, no spaces)."""
    flags = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            flags += _sets(value, f"{prefix}{key}.")
        else:
            flags.append(f"--set={prefix}{key}={json.dumps(value, separators=(',', ':'))}")
    return flags


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "s2s.cli", *args]


def _losses(path: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row}


def test_codec_resume_after_kill_matches_uninterrupted_run(tiny_corpus: Path, project_root: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["train", "codec", "--no-mlflow", *_sets(TINY)]
    reference = project_root / "reference"
    subprocess.run(_cli(*base, f"--set=codec_train.out_dir={reference}"), check=True, env=env, capture_output=True)
    expected = _losses(reference / "metrics.jsonl")
    assert len(expected) == 40 and expected[40] < expected[1], "the loss falls"

    killed = project_root / "killed"
    metrics = killed / "metrics.jsonl"
    process = subprocess.Popen(_cli(*base, f"--set=codec_train.out_dir={killed}"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 10):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint_step = torch.load(killed / "last.pt", weights_only=False)["step"]
    assert 4 <= checkpoint_step < 40, "killed mid-way, after a checkpoint"

    subprocess.run(_cli(*base, f"--set=codec_train.out_dir={killed}", "--resume"), check=True, env=env,
                   capture_output=True)
    resumed = _losses(metrics)
    assert sorted(resumed) == list(range(1, 41))
    assert resumed == pytest.approx(expected, rel=1e-6), "same loss curve as the uninterrupted run"


def test_codec_trains_under_torchrun_with_two_processes(tiny_corpus: Path, project_root: Path):
    out = project_root / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "s2s.cli", "train", "codec", "--no-mlflow",
         *_sets(TINY), "--set=codec_train.max_steps=3", f"--set=codec_train.out_dir={out}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 3


def test_s2s_tokenizes_trains_logs_and_refuses_other_configs(tiny_corpus: Path, project_root: Path, tmp_path: Path):
    from tasks.train_codec import train_codec
    from tasks.train_s2s import train_s2s

    params = load_params("smoke", {**TINY, "codec_train": {**TINY["codec_train"], "max_steps": 4}})
    codec = train_codec(params)
    assert codec.run_id and set(codec.metrics) >= {"snr_db", "si_sdr_db", "mel_distance", "stoi"}

    result = train_s2s(params)
    assert result.steps == 6 and math_finite(result.metrics["perplexity"])
    tokens = project_root / "artifacts/tokens"
    assert {p.name for p in tokens.iterdir()} >= {"train.npz", "val.npz", "test.npz", "codec_config.json"}

    import mlflow

    run = mlflow.get_run(result.run_id)
    assert run.data.tags["corpus_hash"] == "unversioned" and run.data.tags["git_commit"]
    assert "val_perplexity" in run.data.metrics and "cost_usd" in run.data.metrics
    assert (project_root / "mlflow" / "mlflow.db").is_file()

    other = load_params("smoke", {**TINY, "s2s": {**TINY["s2s"], "d_model": 48}})
    with pytest.raises(ValueError, match="another S2S config .*d_model"):
        train_s2s(other, resume=True, track=False)


def math_finite(value: float) -> bool:
    return value == value and value != float("inf")
