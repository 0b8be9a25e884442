"""Utterance classifiers (models/utterance_classifier.py, tasks/evaluation/train_classifier.py).

A tiny corpus of espeak-ng clips, two speakers crossed with two emotions so that neither label
gives the other away, is written as the data flow writes one (manifest + 16 kHz WAVs); both
classifiers are trained on it by the real task and must be right on held-out sentences, and
right far more often than against wrong (swapped) labels.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core import atomic
from core.config import load_params
from core.labels import EMOTIONS, SPEAKERS
from models.utterance_classifier import ClassifierFileError, UtteranceClassifier, load_classifier, save_classifier
from tasks.evaluation.train_classifier import train_classifier
from tests.conftest import REPO, speak

GRID_SPEAKERS = ("male_young", "female_professional")
GRID_EMOTIONS = ("excited", "thinking")
SENTENCES = ("ఈ రోజు వాతావరణం బాగుంది.", "నాకు టీ కావాలి.", "బస్సు ఆలస్యంగా వచ్చింది.",
             "మీ పేరు ఏమిటి?", "రేపు సెలవు రోజు.", "పుస్తకం బల్ల మీద ఉంది.")
SPLITS = ("train", "train", "train", "val", "test", "test")  # by sentence: held-out text is unseen
TINY = {"n_mels": 40, "channels": 24, "batch_size": 8, "max_steps": 150, "lr": 0.004, "crop_seconds": 1.5,
        "seed": 3, "gain_db": 12.0, "heldout_per_control": 0,
        "emotion": {"noise_snr_db": [10.0, 30.0], "mel_shift": 2.0, "adversary_weight": 0.5, "steps_fraction": 1.0,
                    "rendered_per_control": 0},
        "speaker": {"noise_snr_db": None, "mel_shift": 0.0, "adversary_weight": 0.0, "steps_fraction": 1.0}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, one_thread) -> dict:
    """A project root with params.yaml and a 24-clip corpus; the held-out clips by split."""
    root = tmp_path_factory.mktemp("classifier-project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    data = root / "tiny_corpus"  # not `data`: no data.dvc beside it, the corpus is 'unversioned'
    grid = [(s, e, i) for s in GRID_SPEAKERS for e in GRID_EMOTIONS for i in range(len(SENTENCES))]
    with ThreadPoolExecutor(max_workers=4) as pool:
        audios = list(pool.map(lambda item: speak(SENTENCES[item[2]], item[0], item[1]), grid))
    rows, held_out = [], {"val": [], "test": []}
    for (speaker, emotion, i), audio in zip(grid, audios):
        segment = f"{speaker}-{emotion}-{i}"
        atomic.write_wav(data / "segments" / f"{segment}.wav", audio, 16000)
        rows.append({"segment_id": segment, "path": f"segments/{segment}.wav", "split": SPLITS[i],
                     "speaker": speaker, "emotion": emotion, "duration_s": len(audio) / 16000,
                     "text": SENTENCES[i]})
        if SPLITS[i] != "train":
            held_out[SPLITS[i]].append((audio, speaker, emotion))
    pd.DataFrame(rows).to_csv(data / "manifest.csv", index=False)
    params = load_params("smoke", {"paths": {"data": str(data)},
                                   "evaluation": {"out_dir": str(root / "evaluation"), "classifier": TINY}}, root=root)
    return {"params": params, "held_out": held_out["val"] + held_out["test"]}


@pytest.fixture(scope="module")
def trained(corpus: dict) -> dict:
    return {label: train_classifier(corpus["params"], label, use_mlflow=False) for label in ("speaker", "emotion")}


@pytest.mark.parametrize("label", ["speaker", "emotion"])
def test_classifier_is_right_on_held_out_sentences(corpus: dict, trained: dict, label: str) -> None:
    result = trained[label]
    vocabulary = list(SPEAKERS if label == "speaker" else EMOTIONS)
    present = GRID_SPEAKERS if label == "speaker" else GRID_EMOTIONS
    assert result.labels == vocabulary and result.steps == TINY["max_steps"] and not result.cached
    assert result.coverage["test"] == dict.fromkeys(sorted(present, key=vocabulary.index), 4)
    assert result.metrics["items_train"] == 12 and result.metrics["items_test"] == 8
    confusion = np.array(result.confusion_test)
    assert confusion.shape == (len(vocabulary), len(vocabulary)) and confusion.sum() == 8
    assert np.trace(confusion) / 8 == pytest.approx(result.metrics["accuracy_test"])

    model = load_classifier(Path(result.checkpoint))
    clips = [audio for audio, *_ in corpus["held_out"]]
    truth = [speaker if label == "speaker" else emotion for _, speaker, emotion in corpus["held_out"]]
    swapped = [present[1 - present.index(t)] for t in truth]
    predicted = model.predict(clips)
    right = np.mean([p == t for p, t in zip(predicted, truth)])
    wrong = np.mean([p == t for p, t in zip(predicted, swapped)])
    assert right >= 0.9, (label, predicted, truth)
    assert wrong <= 0.1, (label, predicted, swapped)
    assert result.metrics["accuracy_val"] >= 0.75 and result.metrics["accuracy_test"] >= 0.85


def test_trained_classifier_is_reused_until_forced(corpus: dict, trained: dict) -> None:
    again = train_classifier(corpus["params"], "speaker", use_mlflow=False)
    assert again.cached and again.metrics == trained["speaker"].metrics
    assert again.confusion_test == trained["speaker"].confusion_test


def test_predictions_ignore_level_and_padding(corpus: dict, trained: dict) -> None:
    """Level-blind (see the model's docstring) and whole-clip: a batch's padding changes nothing."""
    model = load_classifier(Path(trained["emotion"].checkpoint))
    clips = [audio for audio, *_ in corpus["held_out"][:4]]
    alone = np.concatenate([model.predict_proba([clip]) for clip in clips])
    batched = model.predict_proba(clips)
    quieter = model.predict_proba([clip * 0.1 for clip in clips])
    louder = model.predict_proba([clip * 3.0 for clip in clips])
    assert len({len(c) for c in clips}) > 1  # the batch really is padded
    np.testing.assert_allclose(batched, alone, atol=0.02)
    np.testing.assert_allclose(quieter, alone, atol=0.02)
    np.testing.assert_allclose(louder, alone, atol=0.02)
    longer = np.concatenate([clips[0]] * 4)  # a 4x longer clip is scored whole
    assert model.predict([longer]) == model.predict([clips[0]])


def test_save_load_round_trip(tmp_path: Path, one_thread) -> None:
    torch.manual_seed(0)
    model = UtteranceClassifier(["calm", "loud", "fast"], n_mels=32, channels=8).eval()
    path = save_classifier(tmp_path / "clf.pt", model, {"note": "round trip"})
    loaded = load_classifier(path)
    assert loaded.labels == ["calm", "loud", "fast"] and (loaded.n_mels, loaded.channels) == (32, 8)
    clips = [np.random.default_rng(i).standard_normal(8000 + 3000 * i).astype(np.float32) * 0.1 for i in range(3)]
    np.testing.assert_allclose(loaded.predict_proba(clips), model.predict_proba(clips), atol=1e-6)
    assert loaded.predict(clips) == model.predict(clips)
    assert not [p for p in tmp_path.iterdir() if p.name != "clf.pt"]  # no temporary file left behind


def test_missing_or_foreign_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no utterance classifier"):
        load_classifier(tmp_path / "absent.pt")
    (tmp_path / "noise.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ClassifierFileError, match="not an utterance classifier"):
        load_classifier(tmp_path / "noise.pt")
    torch.save({"model": {}, "config": {}, "step": 3}, tmp_path / "codec.pt")  # another stage's checkpoint
    with pytest.raises(ClassifierFileError, match="not an utterance classifier"):
        load_classifier(tmp_path / "codec.pt")


def test_judge_renderings_avoid_held_out_sentences_and_are_deterministic(corpus: dict) -> None:
    """The judge's extra clips say only train-split sentences no val or test segment speaks; the
    held-out check says val sentences; every (speaker, emotion) gets its clips; same seed, same plan."""
    from tasks.data.corpus_audio import read_manifest
    from tasks.evaluation.judge_renderings import plan_clips, split_sentences

    manifest = read_manifest(corpus["params"].path(corpus["params"].paths.data))
    by_split = split_sentences(manifest)
    assert by_split["val"] == {SENTENCES[3]} and by_split["test"] == {SENTENCES[4], SENTENCES[5]}
    pool = sorted(by_split["train"] - by_split["val"] - by_split["test"])
    plan = plan_clips(pool, 2, [10.0, 20.0], seed=5)
    assert len(plan) == 2 * len(SPEAKERS) * len(EMOTIONS)
    assert {(c.speaker, c.emotion) for c in plan} == {(s, e) for s in SPEAKERS for e in EMOTIONS}
    assert {c.sentence for c in plan} <= set(SENTENCES[:3])
    assert all(plan[i].sentence != plan[i + 1].sentence for i in range(0, len(plan), 2))  # no repeat in a control
    assert plan == plan_clips(pool, 2, [10.0, 20.0], seed=5) and plan != plan_clips(pool, 2, [10.0, 20.0], seed=6)
    assert plan_clips(pool, 0, [10.0], seed=5) == []
    with pytest.raises(ValueError, match="every corpus sentence is spoken in the val or test split"):
        plan_clips([], 1, [10.0], seed=5)


def test_the_emotion_judge_learns_from_renderings_and_is_checked_on_all_controls(corpus: dict) -> None:
    params = corpus["params"]
    classifier = {**TINY, "heldout_per_control": 1, "max_steps": 40,
                  "emotion": {**TINY["emotion"], "rendered_per_control": 1}}
    rendered = params.model_copy(update={"evaluation": params.evaluation.model_copy(update={
        "out_dir": params.evaluation.out_dir.parent / "evaluation-rendered",
        "classifier": type(params.evaluation.classifier).model_validate(classifier)})})
    result = train_classifier(rendered, "emotion", use_mlflow=False)
    assert result.metrics["items_train"] == 12 + len(SPEAKERS) * len(EMOTIONS)   # the corpus + 1 per control
    assert result.metrics["items_rendered"] == len(SPEAKERS) * len(EMOTIONS)     # the held-out check
    assert result.coverage["rendered"] == dict.fromkeys(EMOTIONS, len(SPEAKERS))
    assert 0.0 <= result.metrics["balanced_accuracy_rendered"] <= 1.0
    import json

    confusion = json.loads((Path(result.checkpoint).parent / "confusion.json").read_text())
    assert np.array(confusion["rendered"]).sum() == len(SPEAKERS) * len(EMOTIONS)
    stamp = json.loads((Path(result.checkpoint).parent / "stamp.json").read_text())
    assert stamp["augment"]["rendered_per_control"] == 1 and "corpus_voices" in stamp
    # the speaker judge of the same settings gets the held-out check but no renderings
    speaker = train_classifier(rendered, "speaker", use_mlflow=False)
    assert speaker.metrics["items_train"] == 12 and "accuracy_rendered" in speaker.metrics


@pytest.mark.parametrize("key, value", [("emotion.rendered_per_control", -1), ("heldout_per_control", -2)])
def test_a_negative_rendering_count_is_refused_with_a_clear_error(key: str, value: int) -> None:
    from core.config import ConfigError, parse_overrides

    with pytest.raises(ConfigError, match=rf"evaluation\.classifier\.{key}: .*must be 0 \(none\) or more"):
        load_params("smoke", parse_overrides([f"evaluation.classifier.{key}={value}"]), root=REPO)
