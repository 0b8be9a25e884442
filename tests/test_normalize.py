"""Normalization: formats in, 16 kHz mono WAV out at the target loudness; broken files refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from core import atomic
from core.config import load_params
from tasks.data.normalize import MediaError, frame_levels, normalize_all, normalize_recording
from tasks.data.synth_corpus import truncate_file

from .conftest import REPO, speak


@pytest.fixture(scope="module")
def cfg():
    return load_params("smoke", root=REPO).normalize


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speak("ఈ రోజు వాతావరణం చాలా బాగుంది, మనం బయటికి వెళ్దామా?", sample_rate=44100) * 0.1


def test_stereo_mp3_becomes_mono_16k_at_target_loudness(tmp_path: Path, cfg, speech):
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([speech, speech * 0.5], axis=1), 44100)
    mp3 = tmp_path / "stereo.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(stereo), "-b:a", "128k", str(mp3)], check=True)
    rec = normalize_recording(mp3, "r1", "s1", cfg, tmp_path / "out")
    audio, rate = sf.read(rec.wav_path, dtype="float32")
    info = sf.info(rec.wav_path)
    assert rate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
    assert rec.original_channels == 2 and rec.original_sample_rate == 44100 and rec.codec == "mp3"
    assert abs(len(audio) / 16000 - len(speech) / 44100) < 0.1
    loudness = float(AF.loudness(torch.from_numpy(audio).unsqueeze(0), 16000))
    assert abs(loudness - cfg.loudness_lufs) < 1.0
    before = rec.wav_path.stat().st_mtime_ns
    again = normalize_recording(mp3, "r1", "s1", cfg, tmp_path / "out")
    assert again.wav_path.stat().st_mtime_ns == before, "unchanged input is not normalized again"


def test_truncated_and_corrupt_files_are_refused_with_their_reason(tmp_path: Path, cfg, speech):
    whole = atomic.write_wav(tmp_path / "cut.wav", speech, 44100)
    truncate_file(whole, 0.4)
    with pytest.raises(MediaError, match="truncated: the header declares") as caught:
        normalize_recording(whole, "cut", "s", cfg, tmp_path / "out")
    assert caught.value.code == "truncated"

    junk = tmp_path / "junk.mp3"
    junk.write_bytes(np.random.default_rng(0).bytes(20000))
    with pytest.raises(MediaError) as caught:
        normalize_recording(junk, "junk", "s", cfg, tmp_path / "out")
    assert caught.value.code in {"unreadable", "corrupt"} and "junk.mp3" in str(caught.value)

    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    from tasks.data.download import Recording

    done, failures = normalize_all([Recording("s", "empty", empty), Recording("s", "cut", whole)], cfg, tmp_path / "o")
    assert done == [] and set(failures) == {"empty", "cut"}, "each bad file is reported, none stops the others"
    assert not list((tmp_path / "o").rglob("*.wav")), "nothing half-written"


def test_frame_levels_find_clipping_after_gain():
    rng = np.random.default_rng(1)
    clean = (0.3 * np.sin(np.arange(16000) * 0.05) + 0.01 * rng.standard_normal(16000)).astype(np.float32)
    clipped = np.clip(clean * 6, -1, 1) * 0.5  # saturated, then turned down: flat tops at 0.5
    assert frame_levels(clean, 16000)["clip_fraction"].mean() < 0.001
    assert frame_levels(clipped, 16000)["clip_fraction"].mean() > 0.2
    quiet = frame_levels(clean * 10 ** (-50 / 20), 16000)["rms_db"]
    assert np.median(quiet) < -55
