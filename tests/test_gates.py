"""The codec gate against reference codecs on the same audio: a candidate must beat 8-bit mu-law
PCM at its own bitrate (mel distance, STOI, and SNR when SNR is gated) and match every codec named
in beat_codecs (Codec2 1.6 kbps on smoke) on STOI and PESQ-wb, besides the absolute thresholds."""

from __future__ import annotations

from core.config import load_params
from tasks.evaluation.gates import codec_gate

MULAW = {"snr_db": 0.03, "si_sdr_db": -21.4, "mel_distance": 4.2, "stoi": 0.31, "pesq_wb": 1.02}
CODEC2 = {"snr_db": -2.0, "si_sdr_db": -20.0, "mel_distance": 1.0, "stoi": 0.80, "pesq_wb": 1.66}
GOOD = {"snr_db": -1.0, "si_sdr_db": -15.0, "mel_distance": 0.6, "stoi": 0.90, "pesq_wb": 2.0}
BASELINES = {"mulaw_same_bitrate": MULAW, "codec2_1600bps": CODEC2}


def _gate_settings(**overrides):
    cfg = load_params("smoke").gates.codec
    return cfg.model_copy(update=overrides)


def test_codec_gate_passes_a_codec_that_beats_its_baselines() -> None:
    result = codec_gate(GOOD, BASELINES, _gate_settings())
    assert result.passed, result.reason
    assert [(c.metric, c.note) for c in result.checks if c.note] == [
        ("mel_distance", "mu-law at the same bitrate"), ("stoi", "mu-law at the same bitrate"),
        ("stoi", "codec2_1600bps"), ("pesq_wb", "codec2_1600bps")]


def test_codec_gate_fails_when_codec2_wins_on_pesq() -> None:
    worse = {**GOOD, "pesq_wb": 1.5}
    result = codec_gate(worse, BASELINES, _gate_settings(min_pesq_wb=1.0))
    assert not result.passed
    assert result.reason == "pesq_wb 1.5 misses >= 1.66 (codec2_1600bps)"
    assert codec_gate(worse, BASELINES, _gate_settings(min_pesq_wb=1.0, beat_codecs=())).passed


def test_codec_gate_compares_snr_with_mulaw_only_when_snr_is_gated() -> None:
    worse = {**GOOD, "snr_db": -0.44}
    assert codec_gate(worse, BASELINES, _gate_settings()).passed   # smoke: SNR reported, not gated
    cfg = _gate_settings(min_snr_db=-10.0)   # the absolute floor passes; only the baseline fails
    result = codec_gate(worse, BASELINES, cfg)
    assert not result.passed
    assert "snr_db -0.44 misses >= 0.03 (mu-law at the same bitrate)" in result.reason


def test_codec_gate_fails_without_a_baseline_to_compare() -> None:
    assert not codec_gate(GOOD, {}, _gate_settings()).passed   # a missing baseline is never a pass
    assert not codec_gate(GOOD, {"mulaw_same_bitrate": MULAW}, _gate_settings()).passed


def test_s2s_gate_asks_to_beat_the_bigram_baseline() -> None:
    from tasks.evaluation.gates import s2s_gate

    cfg = load_params("smoke").gates.s2s.model_copy(update={"max_cross_entropy": 6.0, "max_perplexity": 500.0,
                                                            "max_uniform_ratio": 0.5})
    good = {"cross_entropy": 4.0, "perplexity": 54.6, "bigram_cross_entropy": 4.5}
    assert s2s_gate(good, 1024, cfg).passed
    result = s2s_gate({**good, "bigram_cross_entropy": 3.9}, 1024, cfg)
    assert result.reason == "cross_entropy 4 misses <= 3.9 (per-codebook bigram baseline)"
    assert not s2s_gate({k: v for k, v in good.items() if k != "bigram_cross_entropy"}, 1024, cfg).passed


def test_bigram_baseline_knows_a_predictable_sequence_from_noise() -> None:
    import math

    import torch

    from tasks.training.train_s2s import Pair, bigram_cross_entropy

    cycle = torch.arange(300) % 5
    predictable = [Pair(cycle[None], torch.stack([cycle, (cycle + 1) % 5]), 0, 0) for _ in range(3)]
    assert bigram_cross_entropy(predictable, predictable[:1], 16) < 0.5
    g = torch.Generator().manual_seed(0)
    noise = [Pair(cycle[None], torch.randint(16, (2, 2000), generator=g), 0, 0) for _ in range(3)]
    assert bigram_cross_entropy(noise[:2], noise[2:], 16) > 0.9 * math.log(16)
