"""Training tasks on a tiny corpus: exact resume after a kill, DDP on 2 CPU processes, S2S."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.config import load_params

from .conftest import TINY, cli_sets

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "s2s.cli", *args]


def _losses(path: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row}


def test_codec_resumed_after_a_kill_matches_the_uninterrupted_run_and_other_settings_start_over(
        tiny_corpus: Path, project_root: Path):
    """What a pipeline run started again after a kill -9 does (`--auto-resume`, the flows' resume="auto";
    `--resume` takes the same path without the stamp check): last.pt of the same settings is
    continued, to the uninterrupted run's losses, its curve points kept; a checkpoint of other
    settings is started over, the output says which settings differ, and curve.jsonl then holds the
    new run's points only."""
    from tasks.training.curve import read_curve

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    total = 120  # room to kill it mid-way on a loaded machine, where this test polls seconds apart
    base = ["train", "codec", "--no-mlflow", *cli_sets(TINY), f"--set=codec_train.max_steps={total}",
            f"--set=codec_train.curve_steps=[2,{total}]"]
    reference, killed = project_root / "reference", project_root / "killed"
    subprocess.run(_cli(*base, f"--set=codec_train.out_dir={reference}"), check=True, env=env, capture_output=True)
    expected = _losses(reference / "metrics.jsonl")
    assert len(expected) == total and expected[total] < expected[1], "the loss falls"

    metrics = killed / "metrics.jsonl"
    process = subprocess.Popen(_cli(*base, f"--set=codec_train.out_dir={killed}"), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # a loaded machine
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 10):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint_step = torch.load(killed / "last.pt", weights_only=False)["step"]
    assert 4 <= checkpoint_step < total, "killed mid-way, after a checkpoint"
    [first_point] = read_curve(killed)
    assert first_point["step"] == 2

    again = subprocess.run(_cli(*base, f"--set=codec_train.out_dir={killed}", "--auto-resume"), env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"codec training continues {killed / 'last.pt'} at step {checkpoint_step}" in again.stdout, again.stdout
    resumed = _losses(metrics)
    assert sorted(resumed) == list(range(1, total + 1))
    assert resumed == pytest.approx(expected, rel=1e-6), "same loss curve as the uninterrupted run"
    assert read_curve(killed)[0] == first_point and [p["step"] for p in read_curve(killed)] == [2, total]

    other = subprocess.run(_cli(*base, f"--set=codec_train.out_dir={killed}", "--auto-resume",
                                "--set=codec_train.max_steps=3", "--set=codec_train.curve_steps=[3]"),
                           env=env, capture_output=True, text=True)
    assert other.returncode == 0, other.stderr[-3000:]
    assert (f"codec training starts over at step 0: {killed / 'last.pt'} is not continued, it was made with other "
            "settings (differs in: train.curve_steps, train.max_steps)") in other.stdout, other.stdout
    assert sorted(_losses(metrics)) == [1, 2, 3] and [p["step"] for p in read_curve(killed)] == [3]


def test_codec_trains_under_torchrun_with_two_processes(tiny_corpus: Path, project_root: Path):
    out = project_root / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "s2s.cli", "train", "codec", "--no-mlflow",
         *cli_sets(TINY), "--set=codec_train.max_steps=3", f"--set=codec_train.out_dir={out}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 3


def test_s2s_tokenizes_trains_logs_and_refuses_other_configs(tiny_corpus: Path, project_root: Path, tmp_path: Path):
    from tasks.training.train_codec import train_codec
    from tasks.training.train_s2s import train_s2s

    params = load_params("smoke", {**TINY, "codec_train": {**TINY["codec_train"], "max_steps": 4},
                                   "s2s_train": {**TINY["s2s_train"], "reply_renderings": 2}})
    codec = train_codec(params)
    assert codec.run_id and set(codec.metrics) >= {"snr_db", "si_sdr_db", "mel_distance", "stoi"}

    result = train_s2s(params)
    assert result.steps == 6 and math_finite(result.metrics["perplexity"])
    tokens = project_root / "artifacts/tokens"
    assert {p.name for p in tokens.iterdir()} >= {"train.npz", "val.npz", "test.npz", "codec_config.json"}

    # 3 train pairs, each reply spoken again in 2 other (speaker, emotion) pairs, cached.
    from tasks.training.reply_renderings import load_renderings

    renderings = load_renderings(tokens / "renderings")
    train_pairs = [json.loads(line) for line in (tiny_corpus / "pairs.jsonl").read_text().splitlines()
                   if '"train"' in line]
    assert len(renderings) == 2 * len(train_pairs) == 6
    original = {p["input_segment"]: (p["reply_speaker"], p["reply_emotion"]) for p in train_pairs}
    assert all((r.speaker, r.emotion) != original[r.input_segment] for r in renderings)
    assert all(r.codes.shape[0] == 2 and r.codes.shape[1] > 20 and r.text is not None for r in renderings)

    import mlflow

    run = mlflow.get_run(result.run_id)
    assert run.data.params["train_pairs"] == "9"
    assert run.data.tags["corpus_hash"] == "unversioned" and run.data.tags["git_commit"]
    assert "val_perplexity" in run.data.metrics and "cost_usd" in run.data.metrics
    assert (project_root / "mlflow" / "mlflow.db").is_file()

    other = load_params("smoke", {**TINY, "s2s": {**TINY["s2s"], "d_model": 48}})
    with pytest.raises(ValueError, match="another S2S config .*d_model"):
        train_s2s(other, resume=True, track=False)


def math_finite(value: float) -> bool:
    return value == value and value != float("inf")


def test_curve_points_and_snapshots_then_the_curve_report(tiny_corpus: Path, project_root: Path):
    """Runs score themselves at curve_steps and keep snapshots; `s2s curve` tabulates and scores them."""
    from tasks.evaluation.training_curve import training_curve
    from tasks.training.curve import read_curve, snapshot_path
    from tasks.training.train_codec import train_codec
    from tasks.training.train_s2s import train_s2s

    params = load_params("smoke", {**TINY, "codec_train": {**TINY["codec_train"], "max_steps": 4, "curve_steps": [2, 4],
                                                           "extra_voice_clips": 2},
                                   "s2s_train": {**TINY["s2s_train"], "curve_steps": [3, 6]}})
    codec = train_codec(params, track=False)
    points = read_curve(project_root / "artifacts/codec")
    assert [p["step"] for p in points] == [2, 4]
    assert all({"stoi", "unseen_stoi", "train_minutes"} <= set(p) for p in points)
    assert 0 < points[0]["train_minutes"] <= points[1]["train_minutes"] <= codec.seconds / 60 + 1e-3
    assert points[1]["stoi"] == pytest.approx(codec.metrics["stoi"], abs=1e-3), "the last point is the final model"

    train_s2s(params, track=False)
    s2s_dir = project_root / "artifacts/s2s"
    assert [p["step"] for p in read_curve(s2s_dir)] == [3, 6]
    assert snapshot_path(s2s_dir, 3).is_file() and snapshot_path(s2s_dir, 6).is_file()

    report = training_curve(params, score_replies=True)
    assert all("reply_intelligibility_cer" in p for p in report["s2s"]), report["s2s"]
    text = (project_root / "artifacts/curve-smoke.md").read_text()
    assert "## codec" in text and "| 2 |" in text and "| 6 |" in text

    # a run of other settings starts at step 0: the curve and snapshots are the new run's alone
    train_s2s(load_params("smoke", {**TINY, "codec_train": {**TINY["codec_train"], "max_steps": 4,
                                                            "curve_steps": [2, 4], "extra_voice_clips": 2},
                                    "s2s_train": {**TINY["s2s_train"], "curve_steps": [5]}}), track=False)
    assert [p["step"] for p in read_curve(s2s_dir)] == [5]
    assert sorted(p.name for p in (s2s_dir / "snapshots").iterdir()) == [snapshot_path(s2s_dir, 5).name]


def test_codec_only_voices_are_deterministic_and_hold_out_the_unseen_set():
    from tasks.evaluation.unseen_voices import UNSEEN_VOICES
    from tasks.training.codec_voices import CORPUS_VARIANTS, EXTRA_VARIANTS, extra_voice_clips

    assert not set(EXTRA_VARIANTS) & (set(UNSEEN_VOICES) | set(CORPUS_VARIANTS))
    first, again = extra_voice_clips(3, seed=5), extra_voice_clips(3, seed=5)
    assert len(first) == 3 and all(a.dtype.name == "int16" and len(a) > 16000 for a in first)
    assert all((a == b).all() for a, b in zip(first, again))
    assert extra_voice_clips(0, seed=5) == []


def test_reply_renderings_plan_other_controls_in_balance():
    from collections import Counter

    from core.labels import EMOTIONS, SPEAKERS
    from tasks.training.reply_renderings import plan_renderings, sentence_of

    assert sentence_of("అరే! మీ పేరు ఏమిటి?") == "మీ పేరు ఏమిటి?"
    assert sentence_of("మీ పేరు ఏమిటి?") == "మీ పేరు ఏమిటి?"
    pairs = [{"input_segment": f"s--{i}", "reply_segment": f"r--{i}", "input_speaker": SPEAKERS[i % 4],
              "reply_speaker": SPEAKERS[(i + 1) % 4], "reply_emotion": EMOTIONS[i % 9]} for i in range(72)]
    texts = {f"r--{i}": "అరే! మీ పేరు ఏమిటి?" for i in range(71)}  # the last reply has no transcript
    plan = plan_renderings(pairs, texts, 6, seed=1)
    assert plan == plan_renderings(pairs, texts, 6, seed=1) and len(plan) == 71 * 6
    by_input = {p["input_segment"]: p for p in pairs}
    for segment, sentence, speaker, emotion in plan:
        pair = by_input[segment]
        assert sentence == "మీ పేరు ఏమిటి?" and speaker != pair["input_speaker"]
        assert (speaker, emotion) != (pair["reply_speaker"], pair["reply_emotion"])
    assert len({(s, e) for _, _, s, e in plan}) == len(SPEAKERS) * len(EMOTIONS)
    emotions = Counter(e for *_, e in plan)
    assert max(emotions.values()) < 1.5 * min(emotions.values())
