"""Classifier-free guidance through the serving paths (the shipped kind: TeluCodec v2 and an S2S
model conditioned at every step): batched replies equal one-by-one replies with and without
guidance, and a model that cannot be guided is refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from serving.bundle import load_bundle
from serving.engine import Engine
from serving.session import GenerationSettings, ReplySession

from .conftest import run_engine, speak


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_guided_batched_replies_equal_one_by_one_replies(bundle_dir: Path, guidance: float, one_thread):
    bundle = load_bundle(bundle_dir)
    assert bundle.codec.kind == "mel" and bundle.s2s.config.guidable
    settings = GenerationSettings(temperature=0.0, top_k=None, max_reply_seconds=0.5, min_reply_seconds=0.1,
                                  guidance=guidance)
    utterances = [speak(t) for t in ("నమస్కారం.", "మీరు ఎలా ఉన్నారు?", "అవును.")]
    expected = [ReplySession(bundle, "male_mature", "thinking", settings).reply(u) for u in utterances]
    engine = Engine(bundle, settings, max_sessions=4).start()
    try:
        for stagger in (False, True):
            for got, want in zip(run_engine(engine, utterances, stagger), expected):
                assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
    finally:
        engine.stop()
    unguided = GenerationSettings(temperature=0.0, top_k=None, max_reply_seconds=0.5, min_reply_seconds=0.1)
    if guidance != 1.0:   # guidance changes what is said
        plain = ReplySession(bundle, "male_mature", "thinking", unguided).reply(utterances[1])
        assert plain.shape != expected[1].shape or not np.allclose(plain, expected[1], atol=1e-5)


def test_guidance_on_a_model_without_a_null_condition_is_refused(v1_bundle_dir: Path):
    bundle = load_bundle(v1_bundle_dir)     # conditioning "slot": trained without conditioning dropout
    settings = GenerationSettings(guidance=2.0)
    with pytest.raises(ValueError, match="guidance 2.0 needs a model trained with conditioning 'every_step'"):
        Engine(bundle, settings, max_sessions=2)
