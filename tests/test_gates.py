"""The codec gate against its trivial baseline: a candidate must beat 8-bit mu-law PCM at its own
bitrate on SNR, mel distance and STOI, besides the absolute thresholds."""

from __future__ import annotations

from core.config import load_params
from tasks.evaluation.gates import codec_gate

MULAW = {"snr_db": 0.03, "si_sdr_db": -21.4, "mel_distance": 4.2, "stoi": 0.31, "pesq_wb": 1.02}
GOOD = {"snr_db": 2.8, "si_sdr_db": -3.0, "mel_distance": 0.66, "stoi": 0.69, "pesq_wb": 1.1}


def _gate_settings(**overrides):
    cfg = load_params("smoke").gates.codec
    return cfg.model_copy(update=overrides)


def test_codec_gate_passes_a_codec_that_beats_mulaw() -> None:
    result = codec_gate(GOOD, {"mulaw_same_bitrate": MULAW}, _gate_settings())
    assert result.passed, result.reason
    assert [c.metric for c in result.checks if c.note] == ["snr_db", "mel_distance", "stoi"]


def test_codec_gate_fails_when_mulaw_wins_on_snr() -> None:
    cfg = _gate_settings(min_snr_db=-10.0)   # the absolute floor passes; only the baseline fails
    worse = {**GOOD, "snr_db": -0.44}
    result = codec_gate(worse, {"mulaw_same_bitrate": MULAW}, cfg)
    assert not result.passed
    assert "snr_db -0.44 misses >= 0.03 (mu-law at the same bitrate)" in result.reason
    assert codec_gate(worse, {"mulaw_same_bitrate": MULAW}, cfg.model_copy(update={"beat_baseline": False})).passed


def test_codec_gate_fails_without_a_baseline_to_compare() -> None:
    result = codec_gate(GOOD, {}, _gate_settings())
    assert not result.passed   # a missing baseline is never a pass
