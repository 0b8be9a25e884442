"""The embedded corpus: enough distinct Telugu text, distinct voices and emotions, honest truth."""

from __future__ import annotations

import re

import numpy as np
import pytest

from core.config import load_params
from core.labels import EMOTIONS, SPEAKERS
from tasks.data.speakers import frame_features
from tasks.data.splits import split_sources
from tasks.data.synth_corpus import PROSODY, VOICES, espeak_command, load_exchanges, plan_episodes

from .conftest import REPO, speak

TELUGU = re.compile(r"^[\u0C00-\u0C7F ,.?!]+$")


def test_dialogues_are_telugu_distinct_and_enough():
    exchanges = load_exchanges()
    sentences = [e.prompt for e in exchanges] + [e.reply for e in exchanges]
    assert len(exchanges) >= 100 and len(set(sentences)) >= 200
    assert all(TELUGU.match(s) for s in sentences)


def test_speakers_and_emotions_are_distinct_settings():
    assert set(VOICES) == set(SPEAKERS) and set(PROSODY) == set(EMOTIONS)
    commands = {(s, e): tuple(espeak_command("నమస్కారం", s, e)) for s in SPEAKERS for e in EMOTIONS}
    assert len(set(commands.values())) == len(SPEAKERS) * len(EMOTIONS)
    assert len(set(PROSODY.values())) == len(EMOTIONS)


def test_speakers_sound_different():
    text = "ఈ రోజు వాతావరణం చాలా బాగుంది కదా, మనం బయటికి వెళ్దామా?"
    pitch = {}
    for name in SPEAKERS:
        _, f0 = frame_features(speak(text, name))
        pitch[name] = float(np.median(f0[f0 > 0]))
    assert pitch["male_mature"] < pitch["male_young"] < pitch["female_professional"] < pitch["female_young"]


def test_episode_plans_cover_every_speaker_and_emotion():
    params = load_params("smoke", root=REPO)
    plans = plan_episodes(params, load_exchanges())
    good = [p for p in plans if p.defect is None]
    assert {s for p in good for s in p.speakers} == set(SPEAKERS)
    assert {p.emotion for p in good} == set(EMOTIONS)
    assert {p.defect for p in plans} == {None, "clipping", "too_quiet", "low_snr", "truncated"}
    assert len({p.media_format for p in good}) == 4


def test_splits_are_deterministic_and_disjoint():
    ids = [f"s{i}" for i in range(20)]
    first = split_sources(ids, 7, 0.1, 0.1)
    assert first == split_sources(list(reversed(ids)), 7, 0.1, 0.1)
    assert sorted(sum(first.values(), [])) == sorted(ids)
    assert len(first["val"]) == 2 and len(first["test"]) == 2
    more = split_sources(ids + ["s20"], 7, 0.1, 0.1)
    moved = {s for name in first for s in first[name] if s not in more[name]}
    assert len(moved) <= 2, "adding a source moves at most the sources at the split edges"
    with pytest.raises(ValueError, match="split fractions"):
        split_sources(ids, 7, 0.6, 0.5)
