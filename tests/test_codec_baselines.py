"""Reference codecs through ffmpeg (Opus, Codec2), the lag they are scored at, and the unseen-voices
set the codec is scored on beside the test split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from models.metrics import stoi
from tasks.evaluation.codec_baselines import REFERENCE_CODECS, BaselineError, ReferenceCodec, align, nominal_lag, round_trip
from tasks.data.synth_corpus import load_exchanges
from tasks.evaluation.unseen_voices import UNSEEN_SENTENCES, UNSEEN_VOICES, unseen_set

from .conftest import speak


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speak("ఈ రోజు వాతావరణం చాలా బాగుంది కదా? అవును, చల్లని గాలి వీస్తోంది.")


@pytest.mark.parametrize("name", sorted(REFERENCE_CODECS))
def test_reference_codecs_code_speech_intelligibly(name: str, speech: np.ndarray) -> None:
    codec = REFERENCE_CODECS[name]
    out = round_trip(speech, 16000, codec)
    assert abs(len(out) - len(speech)) < 0.1 * 16000
    lag = nominal_lag([(speech, out)], max_lag=1600)
    ref, est = align(speech, out, lag)
    assert stoi(ref, est, 16000) > 0.6, f"{name} at lag {lag}"
    assert 0 <= lag < 800


def test_nominal_lag_finds_a_known_delay(speech: np.ndarray) -> None:
    delayed = np.concatenate([np.zeros(123, np.float32), speech])
    assert nominal_lag([(speech, delayed)], max_lag=400) == 123
    early = speech[57:]
    assert nominal_lag([(speech, early)], max_lag=400) == -57
    ref, est = align(speech, early, -57)
    assert np.array_equal(ref, est)


def test_a_failing_reference_codec_names_itself(speech: np.ndarray) -> None:
    broken = ReferenceCodec("opus_bad", 6000, "libopus", "ogg", {"b:a": "-5k"}, 16000)
    with pytest.raises(BaselineError, match="opus_bad: ffmpeg failed"):
        round_trip(speech, 16000, broken)


def test_unseen_set_is_unseen_and_normalised() -> None:
    corpus_text = "\n".join(f"{e.prompt}\n{e.reply}" for e in load_exchanges())
    assert not [s for s in UNSEEN_SENTENCES if s in corpus_text]
    items = unseen_set(4)
    assert sorted(name.split("-")[0] for name, _ in items) == sorted(UNSEEN_VOICES)   # a prefix covers every voice
    for _, audio in items:
        loudness = float(AF.loudness(torch.from_numpy(audio)[None], 16000))
        assert -24.5 < loudness < -21.5 or np.abs(audio).max() > 0.75   # -23 LUFS unless the peak cap won
