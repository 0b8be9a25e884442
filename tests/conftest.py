"""Shared fixtures: a throwaway project root, Telugu test speech from espeak-ng, a Prefect harness."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture()
def project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project root (params.yaml, git, a DVC remote in tmp) that S2S_ROOT points at."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.email", "ci@example.invalid"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.name", "ci"], cwd=root, check=True)
    monkeypatch.setenv("S2S_ROOT", str(root))
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: pin each test's own store explicitly
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    return root


def small_corpus_overrides(tmp_path: Path) -> dict:
    """A corpus of 3 good episodes (4 exchanges each) plus the bad items: under a minute to build."""
    return {"corpus": {"episodes": 3, "exchanges_per_episode": 4},
            "version": {"remote_url": str(tmp_path / "dvc-remote")}}


def speak(text: str, speaker: str = "male_young", emotion: str = "neutral", sample_rate: int = 16000) -> np.ndarray:
    """Telugu speech from espeak-ng as float32 at `sample_rate`."""
    import torch
    import torchaudio.functional as AF

    from tasks.synth_corpus import render_turn

    audio = render_turn(text, speaker, emotion, 22050)
    return AF.resample(torch.from_numpy(audio), 22050, sample_rate).numpy()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny torch nets: a second intra-op thread gains nothing on them, and on a
    busy 2-core runner threads waiting for each other made tests 5-20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for tests that run flows (startup can take ~60 s here)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
