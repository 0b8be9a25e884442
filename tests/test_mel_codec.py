"""TeluCodec v2 (models/mel_codec.py): streaming equals offline, causality, the k-means quantizer,
and clear errors for bad settings and inputs."""

from __future__ import annotations

import pytest
import torch

from models.codecs import codec_from_config
from models.mel_codec import MelCodec, MelCodecConfig, kmeans

SMALL = dict(codebook_size=16, vocoder_dim=32, vocoder_layers=2)


def _fitted(seed: int = 0, **overrides) -> MelCodec:
    """A small codec with its normalisation and codebooks fitted on noise, weights random."""
    torch.manual_seed(seed)
    codec = MelCodec(MelCodecConfig(**{**SMALL, **overrides})).eval()
    wav = torch.randn(2, 1, 320 * 40) * 0.1
    raw = codec.front_end(wav).transpose(1, 2).reshape(-1, codec.config.n_mels)
    codec.fit_normalization(raw)
    codec.fit_quantizer(codec.normalized_mel(wav).transpose(1, 2).reshape(-1, codec.config.n_mels), iterations=4)
    return codec


@pytest.mark.parametrize("vocoder_n_fft, weighting", [(640, 0.0), (1024, 0.0), (640, 1.0)])
def test_streaming_encode_and_decode_equal_offline(vocoder_n_fft: int, weighting: float) -> None:
    codec = _fitted(vocoder_n_fft=vocoder_n_fft, quantizer_weighting=weighting)
    wav = torch.randn(3, 1, 320 * 25) * 0.1
    codes = codec.encode(wav)
    state, pieces = codec.init_encoder_state(3), []
    for chunk in wav.split(320 * 4, dim=-1):       # 4 hops, then a last 1-hop chunk
        c, state = codec.encode_step(chunk, state)
        pieces.append(c)
    assert torch.equal(torch.cat(pieces, dim=-1), codes)

    audio = codec.decode(codes)
    assert audio.shape == (3, 1, 25 * 320)
    state, pieces = codec.init_decoder_state(3), []
    for t in range(0, codes.shape[-1], 3):           # several frames per step, then fewer
        a, state = codec.decode_step(codes[..., t: t + 3], state)
        pieces.append(a)
    torch.testing.assert_close(torch.cat(pieces, dim=-1), audio, atol=1e-5, rtol=1e-4)


def test_codes_and_audio_never_depend_on_the_future() -> None:
    codec = _fitted()
    wav = torch.randn(1, 1, 320 * 20) * 0.1
    later = wav.clone()
    later[..., 320 * 12:] = torch.randn(1, 1, 320 * 8)     # change everything from frame 12 on
    codes, changed = codec.encode(wav), codec.encode(later)
    assert torch.equal(codes[..., :12], changed[..., :12])
    assert not torch.equal(codes[..., 12:], changed[..., 12:])
    audio, changed_audio = codec.decode(codes), codec.decode(changed)
    assert torch.equal(audio[..., : 12 * 320], changed_audio[..., : 12 * 320])
    assert codec.delay_samples == 320 and codec.algorithmic_latency_ms == 40.0
    assert codec.bitrate() == 50 * 4 * 4    # 4 codebooks of 16 codes at 50 frames/s


def test_quantizer_error_falls_with_every_codebook_and_kmeans_finds_clusters() -> None:
    codec = MelCodec(MelCodecConfig(**SMALL))
    frames = torch.randn(2000, codec.config.n_mels)
    errors = codec.fit_quantizer(frames, iterations=5)
    assert len(errors) == 4 and all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[0] < float(frames.pow(2).mean())
    centres = torch.tensor([[-5.0, 0.0], [5.0, 0.0]])
    points = torch.cat([centres[0] + 0.1 * torch.randn(200, 2), centres[1] + 0.1 * torch.randn(200, 2)])
    found = kmeans(points, 2, 10, torch.Generator().manual_seed(0))
    assert torch.allclose(found[found[:, 0].argsort()], centres, atol=0.05)
    with pytest.raises(ValueError, match="at least 16 frames"):
        kmeans(points[:10], 16, 3, torch.Generator())


def test_quantizer_weighting_spends_the_codes_where_the_log_mel_varies() -> None:
    """quantizer_weighting 1: k-means measures its error in log-mel units, so bins whose level
    varies most (the formants) are coded more finely than in the normalised mel's z-scores, where
    a bin that hardly moves counts the same. 0 is the plain normalised mel, exactly."""
    torch.manual_seed(0)
    frames = torch.randn(3000, 80)                       # normalised mel: every bin std 1
    std = torch.cat([torch.full((40,), 4.0), torch.full((40,), 0.25)])  # raw spread per bin
    errors = {}
    for weighting in (0.0, 1.0):
        codec = MelCodec(MelCodecConfig(**{**SMALL, "quantizer_weighting": weighting}))
        codec.mel_std.copy_(std)
        codec.fit_quantizer(frames, iterations=5)
        coded = codec.dequantize(codec.quantize(frames.t()[None]))[0].t()
        errors[weighting] = float(((coded - frames) * std).pow(2).mean())   # in log-mel units
        if weighting == 0.0:
            assert torch.equal(codec.quantize(frames.t()[None]), codec.quantizer.encode(frames.t()[None]))
            assert torch.equal(codec.quantizer_scale(), torch.ones(80))
    assert errors[1.0] < 0.9 * errors[0.0]
    with pytest.raises(ValueError, match="quantizer_weighting"):
        from core.config import load_params
        load_params("smoke", {"codec": {"mel": {"quantizer_weighting": -1.0}}})


def test_checkpoint_round_trip_and_kind_dispatch() -> None:
    codec = _fitted()
    config = codec.config_dict()
    assert config["kind"] == "mel"
    again = codec_from_config(config)
    again.load_checkpoint_state(codec.state_dict(), config)
    wav = torch.randn(1, 1, 320 * 10) * 0.1
    assert torch.equal(again.eval().encode(wav), codec.encode(wav))
    assert codec_from_config({"sample_rate": 16000, "channels": 8, "latent_dim": 8, "strides": [2, 4, 5, 8],
                              "n_codebooks": 2, "codebook_size": 8, "kernel_size": 7}).kind == "conv"
    with pytest.raises(ValueError, match="unknown codec kind 'wavelet'"):
        codec_from_config({"kind": "wavelet"})
    with pytest.raises(ValueError, match="vocoder_dim"):
        again.check_compatible({**config, "vocoder_dim": 64})


def test_bad_settings_and_inputs_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown mel codec config fields: hop"):
        MelCodecConfig.from_dict({"hop": 256})
    with pytest.raises(ValueError, match="shorter than the hop"):
        MelCodec(MelCodecConfig(**{**SMALL, "vocoder_n_fft": 256}))
    codec = _fitted()
    with pytest.raises(ValueError, match="whole hops of 320 samples, got 100"):
        codec.encode_step(torch.zeros(1, 1, 100), codec.init_encoder_state(1))
    with pytest.raises(ValueError, match=r"expected wav of shape \(batch, 1, samples\)"):
        codec.encode(torch.zeros(1, 320))


def test_digital_silence_codes_as_the_corpus_quietest_level() -> None:
    codec = _fitted()
    silence = codec.normalized_mel(torch.zeros(1, 1, 320 * 5))
    floor = ((codec.mel_floor - codec.mel_mean) / codec.mel_std)[None, :, None].expand_as(silence)
    torch.testing.assert_close(silence, floor)
    assert (codec.mel_floor > -11).all()   # lifted from the front end's log(1e-5) to the fitted floor


@pytest.mark.parametrize("vocoder_n_fft, weighting", [(640, 0.0), (1024, 1.0)])
def test_onnx_streaming_decode_equals_offline_decode(vocoder_n_fft: int, weighting: float) -> None:
    """The v2 decoder on ONNX Runtime (inverse FFT as two matrix products) gives decode's samples,
    one live stream (static shapes) and many sessions (dynamic batch) alike."""
    import numpy as np

    from models.codec_onnx import OnnxStreamingDecoder

    codec = _fitted(vocoder_n_fft=vocoder_n_fft, quantizer_weighting=weighting)
    codes = torch.randint(0, 16, (3, 4, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = codec.decode(codes).numpy()
    for batch, rows in ((None, slice(0, 3)), (1, slice(1, 2))):
        decoder = OnnxStreamingDecoder(codec, batch=batch)
        state, frames = decoder.init_state(rows.stop - rows.start), []
        for f in range(codes.shape[-1]):
            audio, state = decoder.step(codes[rows, :, f:f + 1], state)
            frames.append(audio)
        np.testing.assert_allclose(np.concatenate(frames, axis=-1), full[rows], atol=2e-5, rtol=0)
    bound, frames = decoder.init_bound_state(), []
    for f in range(codes.shape[-1]):
        frames.append(decoder.step_bound(codes[1:2, :, f:f + 1], bound))
    np.testing.assert_allclose(np.concatenate(frames, axis=-1), full[1:2], atol=2e-5, rtol=0)
