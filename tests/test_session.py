"""The one-conversation serving session (the pyfunc model and the quality evaluation run it): streaming
encode while the user speaks, a reply streamed frame by frame, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from serving.bundle import BundleError, ModelBundle, load_bundle
from serving.session import GenerationSettings, ReplySession, SessionError

from .conftest import speak


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> ModelBundle:
    return load_bundle(bundle_dir)


def test_streamed_encoding_equals_whole_utterance_encoding(bundle: ModelBundle):
    speech = speak("నమస్కారం, మీరు ఎలా ఉన్నారు?")
    session = ReplySession(bundle, seed=1)
    for start in range(0, len(speech), 333):  # chunks that do not align with the 320-sample hop
        session.feed(speech[start: start + 333])
    session._encode(np.pad(session.pending, (0, session.hop - len(session.pending))))
    streamed = torch.cat(session.codes, dim=-1)
    whole = bundle.codec.encode(torch.from_numpy(speech)[None, None])
    assert torch.equal(streamed, whole)


def test_reply_streams_frames_and_the_session_serves_the_next_turn(bundle: ModelBundle):
    settings = GenerationSettings(temperature=0.8, top_k=8, max_reply_seconds=0.4, min_reply_seconds=0.1)
    session = ReplySession(bundle, "male_mature", "laugh", settings, seed=3)
    session.feed(speak("ఈ రోజు వాతావరణం చాలా బాగుంది."))
    frames = list(session.end_of_utterance())
    assert 5 <= len(frames) <= 20 and all(f.shape == (320,) and f.dtype == np.float32 for f in frames)
    assert session.samples_in == 0, "the turn is over: the session is ready for the next one"
    session.set_voice("female_professional", "empathy")
    assert len(session.reply(speak("సరే."))) >= 5 * 320  # min_reply_seconds: never an empty reply


def test_the_same_seed_gives_the_same_reply(bundle: ModelBundle):
    speech = speak("మన ఊరికి బస్సు ఎప్పుడు వస్తుంది?")
    settings = GenerationSettings(max_reply_seconds=0.3)
    one = ReplySession(bundle, settings=settings, seed=5).reply(speech)
    two = ReplySession(bundle, settings=settings, seed=5).reply(speech)
    assert np.array_equal(one, two)


def test_bad_input_gets_a_named_error(bundle: ModelBundle, bundle_dir: Path):
    with pytest.raises(SessionError, match="unknown speaker 'robot': one of male_young"):
        ReplySession(bundle, speaker="robot")
    session = ReplySession(bundle)
    with pytest.raises(SessionError, match="unknown emotion 'angry'") as info:
        session.set_voice("male_young", "angry")
    assert info.value.code == "unknown_emotion"
    with pytest.raises(SessionError, match="end of utterance before any audio"):
        list(session.end_of_utterance())
    short = ReplySession(bundle, settings=GenerationSettings(max_utterance_seconds=1.0))
    with pytest.raises(SessionError, match="longer than 1 s") as info:
        short.feed(np.zeros(20000, dtype=np.float32))
    assert info.value.code == "utterance_too_long"

    corrupt = bundle_dir.parent / "corrupt"
    corrupt.mkdir()
    for name in ("codec.pt", "s2s.pt", "bundle.json"):
        (corrupt / name).write_bytes((bundle_dir / name).read_bytes())
    (corrupt / "codec.pt").write_bytes((bundle_dir / "codec.pt").read_bytes()[:-10] + b"0" * 10)
    with pytest.raises(BundleError, match="codec.pt does not match the sha256"):
        load_bundle(corrupt)
    with pytest.raises(BundleError, match="no model bundle at"):
        load_bundle(bundle_dir.parent / "missing")
