"""The shipped model kind through the serving paths: TeluCodec v2 with an S2S model conditioned at
every step. Batched replies equal one-by-one replies with and without classifier-free guidance,
and a bundle that cannot be guided is refused with a clear error."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from models.mel_codec import MelCodec, MelCodecConfig
from models.s2s_transformer import S2SConfig, S2STransformer
from serving.bundle import export_bundle, load_bundle
from serving.engine import Engine
from serving.session import GenerationSettings, ReplySession

from .conftest import speak
from .test_serving import run_engine
from .test_session import bundle_dir  # noqa: F401  (moved to conftest by the layout change)


@pytest.fixture(scope="module")
def v2_bundle_dir(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    """A tiny random v2 bundle whose codec is fitted on speech (codes vary with the input)."""
    torch.manual_seed(0)
    codec = MelCodec(MelCodecConfig(n_codebooks=2, codebook_size=16, vocoder_dim=16, vocoder_layers=1))
    wav = torch.from_numpy(speak("నమస్కారం, మీరు ఎలా ఉన్నారు?"))[None, None]
    codec.fit_normalization(codec.front_end(codec._pad(wav))[0].t())
    codec.fit_quantizer(codec.normalized_mel(wav)[0].t(), iterations=3)
    s2s_config = S2SConfig(n_codebooks=2, codebook_size=16, d_model=16, n_layers=1, n_heads=2, max_len=128,
                           conditioning="every_step")
    s2s = S2STransformer(s2s_config)
    with torch.no_grad():
        s2s.speaker_embedding.weight.mul_(20)    # a random model whose replies depend on the voice
    root = tmp_path_factory.mktemp("bundle-v2")
    torch.save({"config": codec.config_dict(), "model": codec.state_dict()}, root / "codec.pt")
    torch.save({"config": asdict(s2s_config), "codec_config": codec.config_dict(), "model": s2s.state_dict()},
               root / "s2s.pt")
    return export_bundle(root / "codec.pt", root / "s2s.pt", root / "bundle", {"model_name": "tiny-v2"})


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_v2_batched_replies_equal_one_by_one_replies(v2_bundle_dir: Path, guidance: float, one_thread):
    bundle = load_bundle(v2_bundle_dir)
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


def test_guidance_on_a_model_without_a_null_condition_is_refused(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)     # conditioning "slot": trained without conditioning dropout
    settings = GenerationSettings(guidance=2.0)
    with pytest.raises(ValueError, match="guidance 2.0 needs a model trained with conditioning 'every_step'"):
        Engine(bundle, settings, max_sessions=2)
