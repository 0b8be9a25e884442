"""The pyannote.audio diarization backend, run for real on a pipeline built here, offline.

The hub's pipelines are gated and the tests have no network, so the module fixture builds a
complete pyannote 4 SpeakerDiarization pipeline on disk, laid out like a hub snapshot of
pyannote/speaker-diarization-community-1: a PyanNet segmentation model and an XVectorMFCC
embedding model, both tiny and trained for a few seconds on two synthetic "voices" (harmonic
tones at 110 Hz and 220 Hz with syllable-like amplitude modulation), an identity PLDA for VBx
clustering, and a config.yaml naming them as $model/... subfolders. load_diarizer then loads
that folder through pyannote's own Pipeline.from_pretrained and diarizes fresh audio of the two
voices separated by silences.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tasks.data.diarize_pyannote import _turns, load_diarizer  # noqa: E402

SR = 16000
CHUNK_S = 2.0  # segmentation window of the pipeline (and training crop length)
EMB_DIM = 32
VOICES = {"low": (110.0, 1), "high": (220.0, 2)}  # fundamental (Hz), class in the labels


def _voice(n: int, f0: float, bright: bool, rng: np.random.Generator) -> np.ndarray:
    """A harmonic "voice": vibrato, a spectral tilt per voice, syllable-rate amplitude modulation."""
    t = np.arange(n) / SR
    f = f0 * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f) / SR
    out = np.zeros(n)
    for k in range(1, int(4000 / f0)):
        out += (k ** -0.5 if bright else k ** -1.3) * np.sin(k * phase)
    out *= 0.55 - 0.45 * np.cos(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6))
    return out / np.abs(out).max()


class _Voices:
    """One long take per voice; audio is cut from the takes, which is far cheaper than synthesis."""

    def __init__(self, rng: np.random.Generator, seconds: float = 20.0):
        self.n = int(seconds * SR)
        self.takes = {name: _voice(self.n, f0, name == "high", rng) for name, (f0, _) in VOICES.items()}

    def render(self, layout: list[tuple[float, str | None]], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Audio for [(seconds, voice or None for silence), ...] and per-sample labels (0 silence)."""
        parts, labels = [], []
        for seconds, name in layout:
            k = int(seconds * SR)
            if name is None:
                parts.append(np.zeros(k))
                labels.append(np.zeros(k, int))
            else:
                start = rng.integers(0, self.n - k)
                parts.append(rng.uniform(0.3, 0.6) * self.takes[name][start:start + k])
                labels.append(np.full(k, VOICES[name][1]))
        audio = np.concatenate(parts)
        audio = audio + 0.003 * rng.standard_normal(len(audio))
        return audio.astype(np.float32), np.concatenate(labels)


def _random_layout(seconds: float, rng: np.random.Generator) -> list[tuple[float, str | None]]:
    layout, total = [], 0.0
    while total < seconds:
        name = rng.choice([None, "low", "high"], p=[0.3, 0.35, 0.35])
        length = rng.uniform(0.2, 0.8) if name is None else rng.uniform(0.3, 1.5)
        layout.append((length, name))
        total += length
    return layout


def _save(model, path: Path) -> None:
    """Write a checkpoint the way lightning does, which is what Model.from_pretrained reads."""
    import lightning
    import torch

    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    model.on_save_checkpoint(checkpoint)  # adds pyannote's versions, architecture, specifications
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)


def _train_segmentation(voices: _Voices, rng: np.random.Generator, steps: int = 60):
    """Tiny powerset PyanNet (2 local speakers, no overlap), permutation-invariant loss."""
    import torch
    import torch.nn.functional as F
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.segmentation import PyanNet

    model = PyanNet(lstm={"hidden_size": 32, "num_layers": 1}, linear={"hidden_size": 32, "num_layers": 1})
    model.specifications = Specifications(
        problem=Problem.MONO_LABEL_CLASSIFICATION, resolution=Resolution.FRAME, duration=CHUNK_S,
        classes=["speaker#1", "speaker#2"], powerset_max_classes=1, permutation_invariant=True)
    model.setup()  # adds the classifier for these specifications
    n = int(CHUNK_S * SR)
    field = model.receptive_field
    centres = ((field.start + np.arange(model.num_frames(n)) * field.step + field.duration / 2) * SR)
    centres = np.clip(centres.astype(int), 0, n - 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = [voices.render(_random_layout(CHUNK_S, rng), rng) for _ in range(8)]
        x = torch.from_numpy(np.stack([a[:n] for a, _ in batch]))[:, None]
        y = torch.from_numpy(np.stack([lab[:n][centres] for _, lab in batch]))
        log_probs = model(x).transpose(1, 2)  # (batch, powerset class, frame)
        swapped = torch.where(y == 0, 0, 3 - y)
        loss = torch.minimum(F.nll_loss(log_probs, y, reduction="none").mean(1),
                             F.nll_loss(log_probs, swapped, reduction="none").mean(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _train_embedding(voices: _Voices, rng: np.random.Generator, steps: int = 20):
    """Small-output XVectorMFCC, trained with a cosine softmax to tell the two voices apart."""
    import torch
    import torch.nn.functional as F
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.embedding import XVectorMFCC

    model = XVectorMFCC(mfcc={"melkwargs": {"n_mels": 40}}, dimension=EMB_DIM)
    model.specifications = Specifications(problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK,
                                          duration=CHUNK_S, min_duration=0.5)
    model.setup()
    head = torch.nn.Parameter(torch.randn(2, EMB_DIM))
    optimizer = torch.optim.Adam([*model.parameters(), head], lr=1e-3)
    model.train()
    for _ in range(steps):
        names = rng.choice(["low", "high"], size=8)
        x = torch.from_numpy(np.stack([voices.render([(1.0, name)], rng)[0] for name in names]))[:, None]
        logits = 10 * F.normalize(model(x), dim=1) @ F.normalize(head, dim=1).T
        loss = F.cross_entropy(logits, torch.tensor([VOICES[name][1] - 1 for name in names]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


CONFIG = """\
pipeline:
  name: pyannote.audio.pipelines.SpeakerDiarization
  params:
    segmentation: $model/segmentation
    segmentation_step: 0.2
    segmentation_batch_size: 16
    embedding: $model/embedding
    embedding_batch_size: 16
    plda: $model/plda
    clustering: VBxClustering
params:
  segmentation:
    min_duration_off: 0.0
  clustering:
    threshold: 0.6
    Fa: 0.07
    Fb: 0.8
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def voices() -> _Voices:
    return _Voices(np.random.default_rng(0))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory, voices: _Voices) -> Path:
    """A local pyannote pipeline folder, laid out like a hub snapshot."""
    import torch

    root = tmp_path_factory.mktemp("diarization")
    rng = np.random.default_rng(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _save(_train_segmentation(voices, rng), root / "segmentation" / "pytorch_model.bin")
        _save(_train_embedding(voices, rng), root / "embedding" / "pytorch_model.bin")
    # identity PLDA: VBx then clusters the length-normalised embeddings as they are
    (root / "plda").mkdir()
    zeros, eye = np.zeros(EMB_DIM), np.eye(EMB_DIM)
    np.savez(root / "plda" / "xvec_transform.npz", mean1=zeros, mean2=zeros, lda=eye)
    np.savez(root / "plda" / "plda.npz", mu=zeros, tr=eye, psi=np.ones(EMB_DIM))
    (root / "config.yaml").write_text(CONFIG)
    return root


class NetworkAttempted(BaseException):
    """Not an Exception, so that no `except Exception` on the way can swallow it."""


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Offline hub, and any name lookup or socket connection fails the test."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise NetworkAttempted(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not attempts, f"network access attempted: {attempts}"


def test_diarizes_two_voices_with_a_local_pipeline(pipeline_dir: Path, voices: _Voices, no_network) -> None:
    layout = [(1.0, None), (3.0, "low"), (1.0, None), (3.0, "high"), (0.8, None),
              (2.5, "low"), (1.0, None), (3.0, "high"), (1.0, None)]
    audio, truth = voices.render(layout, np.random.default_rng(123))
    duration = len(audio) / SR

    turns = load_diarizer(str(pipeline_dir))(audio)

    assert turns, "no speech found"
    assert turns == sorted(turns, key=lambda t: t[0])
    for start, end, label in turns:
        assert isinstance(start, float) and isinstance(end, float) and isinstance(label, str)
        assert 0.0 <= start < end <= duration + 1e-3
    # frame-level comparison with the truth: speech found, silence left out, voices told apart
    times = np.arange(len(audio)) / SR
    labels = sorted({label for _, _, label in turns})
    hyp = np.full(len(audio), -1)
    for start, end, label in turns:
        hyp[(times >= start) & (times < end)] = labels.index(label)
    assert np.mean(hyp[truth == 0] >= 0) < 0.3, "silence taken for speech"
    dominant = {}
    for name, (_, cls) in VOICES.items():
        found = hyp[(truth == cls) & (hyp >= 0)]
        assert len(found) > 0.8 * np.sum(truth == cls), f"voice {name} mostly missed"
        counts = np.bincount(found)
        dominant[name] = int(counts.argmax())
        assert counts.max() > 0.75 * len(found), f"voice {name} split across speakers"
    assert dominant["low"] != dominant["high"], "both voices given one speaker label"


def test_config_yaml_path_or_its_folder(pipeline_dir: Path, voices: _Voices, no_network) -> None:
    by_folder = load_diarizer(str(pipeline_dir))
    by_file = load_diarizer(str(pipeline_dir / "config.yaml"))
    audio, _ = voices.render([(0.5, None), (1.5, "low"), (0.5, None), (1.5, "high"), (0.5, None)],
                             np.random.default_rng(7))
    turns = by_file(audio)
    assert turns and turns == by_folder(audio)


def test_turns_from_either_pyannote_output() -> None:
    from pyannote.audio.pipelines.speaker_diarization import DiarizeOutput
    from pyannote.core import Annotation, Segment

    full, exclusive = Annotation(), Annotation()
    full[Segment(2.0, 3.0)] = "B"
    full[Segment(0.5, 2.5)] = "A"
    exclusive[Segment(2.0, 3.0)] = "B"
    exclusive[Segment(0.5, 2.0)] = "A"
    assert _turns(full) == [(0.5, 2.5, "A"), (2.0, 3.0, "B")]
    assert _turns(DiarizeOutput(full, exclusive)) == [(0.5, 2.0, "A"), (2.0, 3.0, "B")]


def test_unset_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="segment.pyannote_pipeline must be set"):
        load_diarizer(None)


def test_missing_local_path(tmp_path: Path, no_network) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_diarizer(str(tmp_path / "nowhere" / "config.yaml"))
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_diarizer(str(tmp_path))  # a folder without a pipeline in it


def test_hub_id_without_token(monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ValueError, match="HF_TOKEN") as error:
        load_diarizer("pyannote/speaker-diarization-community-1")
    assert "pyannote/speaker-diarization-community-1" in str(error.value)


def test_hub_failure_names_the_pipeline_not_the_token(monkeypatch: pytest.MonkeyPatch, no_network) -> None:
    secret = "hf_not_a_real_token_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    with pytest.raises(RuntimeError, match=re.escape("example-org/no-such-pipeline")) as error:
        load_diarizer("example-org/no-such-pipeline")
    assert secret not in str(error.value)


def test_broken_config_names_its_path(tmp_path: Path, no_network) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("pipeline:\n  name: pyannote.audio.pipelines.NoSuchPipeline\n")
    with pytest.raises(RuntimeError, match=re.escape(str(config))):
        load_diarizer(str(tmp_path))
