"""Each metric on known cases: identical signals, added noise at a known SNR, uniform logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import MAX_DB, cross_entropy, mel_distance, perplexity, pesq_wb, si_sdr_db, snr_db, stoi

from .conftest import speak


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speak("ఈ రోజు వాతావరణం చాలా బాగుంది కదా, మనం బయటికి వెళ్దామా?").astype(np.float64)


def _with_noise(signal: np.ndarray, snr: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(len(signal))
    noise *= np.sqrt(np.mean(signal**2) / np.mean(noise**2) / 10 ** (snr / 10))
    return signal + noise


def test_snr_and_si_sdr_on_known_noise(speech):
    assert snr_db(speech, speech) == MAX_DB and si_sdr_db(speech, speech) == MAX_DB
    for target in (0.0, 10.0, 25.0):
        noisy = _with_noise(speech, target)
        assert abs(snr_db(speech, noisy) - target) < 0.2
        assert abs(si_sdr_db(speech, noisy) - target) < 0.3
    # a gain error ruins SNR but not SI-SDR
    assert snr_db(speech, 0.5 * speech) < 7 and si_sdr_db(speech, 0.5 * speech) == MAX_DB
    assert snr_db(speech, np.zeros_like(speech)) == 0.0 and si_sdr_db(speech, np.zeros_like(speech)) == -MAX_DB


def test_mel_stoi_pesq_rank_clean_above_noisy(speech):
    mild, heavy = _with_noise(speech, 20), _with_noise(speech, 0)
    assert mel_distance(speech, speech) == 0.0
    assert 0 < mel_distance(speech, mild) < mel_distance(speech, heavy)
    assert stoi(speech, speech) > 0.99 and stoi(speech, mild) > stoi(speech, heavy)
    assert pesq_wb(speech, speech) > 4.4 and pesq_wb(speech, mild) > pesq_wb(speech, heavy)
    assert pesq_wb(np.zeros(16000), np.zeros(16000)) is None
    with pytest.raises(ValueError, match="16000 Hz"):
        pesq_wb(speech, speech, 8000)


def test_cross_entropy_and_perplexity():
    vocab = 259
    uniform = torch.zeros(2, 10, vocab)
    targets = torch.randint(0, vocab, (2, 10))
    assert math.isclose(perplexity(cross_entropy(uniform, targets)), vocab, rel_tol=1e-4)
    sure = torch.full((2, 10, vocab), -30.0).scatter(-1, targets[..., None], 30.0)
    assert perplexity(cross_entropy(sure, targets)) < 1.001
    targets[0, :5] = -100
    assert math.isclose(perplexity(cross_entropy(uniform, targets)), vocab, rel_tol=1e-4), "ignored positions"
