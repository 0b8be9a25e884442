"""Shared fixtures and settings: a throwaway project root, Telugu test speech from espeak-ng, a
Prefect harness, a tiny random bundle, a tiny corpus and the tiny-model and lenient-gate settings,
and require_tool (a missing system tool skips a test locally and fails it under CI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict
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

    from tasks.data.synth_corpus import render_turn

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


@pytest.fixture(scope="session")
def chaos():
    """The fault-injection suite's record (tests/test_chaos*.py), one for the whole session, so every
    module's rows land in the one table `s2s chaos` writes (tests/chaos_report.py)."""
    from .chaos_report import ChaosLog

    log = ChaosLog()
    yield log
    log.write_if_asked()


def require_tool(name: str, found: bool, why: str) -> None:
    """A test that needs a system tool (espeak-ng, Chromium...): skipped when it is missing on a
    developer's machine, but failed under CI (CI=true), where scripts/setup.sh must have installed
    it, so a CI run never passes by skipping."""
    if found:
        return
    message = f"{name} is missing: {why} (scripts/setup.sh installs it)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def _export_tiny_bundle(root: Path, codec, s2s_config, scale_speaker: float = 1.0, scale_text: float = 1.0) -> Path:
    import torch

    from models.s2s_transformer import S2STransformer
    from serving.bundle import export_bundle

    s2s = S2STransformer(s2s_config)
    with torch.no_grad():
        s2s.speaker_embedding.weight.mul_(scale_speaker)
        if s2s_config.text_stream:
            s2s.text_head.weight.mul_(scale_text)
    torch.save({"config": codec.config_dict(), "model": codec.state_dict()}, root / "codec.pt")
    torch.save({"config": asdict(s2s_config), "codec_config": codec.config_dict(), "model": s2s.state_dict()},
               root / "s2s.pt")
    return export_bundle(root / "codec.pt", root / "s2s.pt", root / "bundle", {"model_name": "tiny"})


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    """A tiny random bundle of the kind that ships (it babbles, fast): TeluCodec v2 with its
    quantizer fitted on speech, and an S2S model conditioned at every step (guidable), whose
    speaker embeddings are scaled up so its replies depend on the voice. The serving, load-test
    and demo-page tests' model."""
    from models.s2s_transformer import S2SConfig

    s2s_config = S2SConfig(n_codebooks=2, codebook_size=16, d_model=16, n_layers=1, n_heads=2, max_len=128,
                           conditioning="every_step")
    return _export_tiny_bundle(tmp_path_factory.mktemp("bundle"), _tiny_mel_codec(), s2s_config, scale_speaker=20.0)


def _tiny_mel_codec():
    """TeluCodec v2 at 2 x 16 codes, its quantizer fitted on a sentence of speech."""
    import torch

    from models.mel_codec import MelCodec, MelCodecConfig

    torch.manual_seed(0)
    codec = MelCodec(MelCodecConfig(n_codebooks=2, codebook_size=16, vocoder_dim=16, vocoder_layers=1))
    wav = torch.from_numpy(speak("నమస్కారం, మీరు ఎలా ఉన్నారు? సాయంత్రం ఐదు గంటలకు వస్తుంది."))[None, None]
    codec.fit_normalization(codec.front_end(codec._pad(wav))[0].t())
    codec.fit_quantizer(codec.normalized_mel(wav)[0].t(), iterations=3)
    return codec


@pytest.fixture(scope="module")
def text_bundle_dir(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    """The shipped kind with a text stream: a tiny random bundle whose text head is scaled up, so
    that it says characters (random ones) beside its babble."""
    from models.s2s_transformer import S2SConfig

    s2s_config = S2SConfig(n_codebooks=2, codebook_size=16, d_model=16, n_layers=1, n_heads=2, max_len=128,
                           conditioning="every_step", text_stream=True, text_symbols="అనమరంకా")
    return _export_tiny_bundle(tmp_path_factory.mktemp("bundle-text"), _tiny_mel_codec(), s2s_config,
                               scale_speaker=20.0, scale_text=30.0)


@pytest.fixture(scope="module")
def v1_bundle_dir(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    """A tiny random bundle of the previous kind (TeluCodec v1, conditioning at one slot): what
    versions registered before 2026-11-30 hold, which the server must still load and serve."""
    import torch

    from models.codec import CodecConfig, TeluCodec
    from models.s2s_transformer import S2SConfig

    torch.manual_seed(0)
    codec = TeluCodec(CodecConfig(channels=4, latent_dim=8, n_codebooks=2, codebook_size=16))
    s2s_config = S2SConfig(n_codebooks=2, codebook_size=16, d_model=16, n_layers=1, n_heads=2, max_len=128)
    return _export_tiny_bundle(tmp_path_factory.mktemp("bundle-v1"), codec, s2s_config)


def run_engine(engine, utterances: list[np.ndarray], stagger: bool, speaker: str = "male_mature",
               emotion: str = "thinking", texts: dict[int, str] | None = None) -> list[np.ndarray]:
    """Replies of a started serving Engine to each utterance (one session each), optionally
    started at staggered times so rows finish out of order and are moved around; `texts`, when
    given, receives each reply's text (by utterance index)."""
    import threading
    import time

    outputs: dict[int, list[np.ndarray]] = {i: [] for i in range(len(utterances))}
    finished = threading.Event()
    ends: list[int] = []

    def emitter(index: int):
        def emit(event) -> None:
            if event.kind == "audio":
                outputs[index].append(event.pcm)
            elif event.kind == "end":
                if texts is not None:
                    texts[index] = event.text
                ends.append(index)
                if len(ends) == len(utterances):
                    finished.set()
            else:
                raise AssertionError(f"unexpected {event}")
        return emit

    ids = [engine.open(speaker, emotion, emitter(i)) for i in range(len(utterances))]
    for cid, audio in zip(ids, utterances):
        for start in range(0, len(audio), 320):
            engine.post_audio(cid, audio[start: start + 320])
        engine.post_end(cid)
        if stagger:
            time.sleep(0.05)
    assert finished.wait(60), "every reply ends"
    for cid in ids:
        engine.close(cid)
    return [np.concatenate(outputs[i]) for i in range(len(utterances))]


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
    "align": {"channels": 16, "hidden": 16, "layers": 1, "batch_size": 4, "max_steps": 4},
    "s2s_train": {"batch_size": 2, "log_every": 1, "checkpoint_every": 4, "max_steps": 6, "warmup_steps": 2,
                  "max_turn_frames": 60},
    "evaluation": {"threads": 1, "asr": {"channels": 16, "hidden": 16, "layers": 1, "batch_size": 4, "max_steps": 4},
                   "classifier": {"channels": 8, "batch_size": 4, "max_steps": 4, "crop_seconds": 0.5,
                                  "emotion": {"rendered_per_control": 0}},  # tests/test_classifiers.py renders
                   "corpus_items": 2, "reply_inputs": 1, "max_reply_seconds": 0.3, "mos": ["distillmos"]},
}


@pytest.fixture()
def tiny_corpus(project_root: Path) -> Path:
    """data/ as the data flow writes it: 3 sources (one per split), 6 segments each, pairs."""
    import pandas as pd

    from core import atomic

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


def cli_sets(overrides: dict, prefix: str = "") -> list[str]:
    """--set=a.b.c=value for every leaf of a nested override dict (JSON values, no spaces)."""
    flags = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            flags += cli_sets(value, f"{prefix}{key}.")
        else:
            flags.append(f"--set={prefix}{key}={json.dumps(value, separators=(',', ':'))}")
    return flags


LENIENT = {  # a tiny model trained for seconds passes these; the production figures come from params.yaml
    "codec": {"min_snr_db": -100.0, "max_mel_distance": 100.0, "min_stoi": -1.0, "min_pesq_wb": None,
              "beat_baseline": False, "beat_codecs": []},
    "s2s": {"max_cross_entropy": 100.0, "max_perplexity": 1e9, "max_uniform_ratio": 100.0, "beat_bigram": False},
    "latency": {"max_mean_ms": 2000.0, "max_p95_ms": 5000.0, "max_std_ms": 2000.0},  # a busy CI runner
    "quality": {"min_emotion_judge_accuracy": 0.0, "min_speaker_judge_accuracy": 0.0, "max_evaluator_cer": 100.0},  # evaluators trained for 4 steps
}
