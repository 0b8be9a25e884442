"""MOS predictors (tasks/evaluation/mos.py): they must rank clean speech above the same speech in noise."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluation.mos import MosScorer
from tests.conftest import speak

SENTENCE = "బస్సు ఆలస్యంగా వచ్చింది."


@pytest.fixture(scope="module")
def scorer(one_thread) -> MosScorer:
    return MosScorer(["dnsmos", "distillmos"], threads=1)


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    audio = speak(SENTENCE, "female_professional", "neutral")
    return 0.5 * audio / np.abs(audio).max()


def with_noise(audio: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(len(audio)).astype(np.float32)
    noise *= np.sqrt(np.mean(audio ** 2) / np.mean(noise ** 2) / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)


def test_clean_speech_scores_above_noisy_speech(scorer: MosScorer, clean: np.ndarray) -> None:
    noisy = with_noise(clean, 0.0)
    good = scorer.score_clip(clean, 16000)
    bad = scorer.score_clip(noisy, 16000)
    assert list(good) == ["dnsmos_p808", "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "distillmos"]
    assert all(1.0 <= v <= 5.0 for v in (*good.values(), *bad.values())), (good, bad)
    assert good["dnsmos_p808"] > bad["dnsmos_p808"] + 0.5, (good, bad)
    assert good["dnsmos_bak"] > bad["dnsmos_bak"] + 1.0, (good, bad)
    assert good["distillmos"] > bad["distillmos"] + 0.5, (good, bad)

    # score() is the per-key mean over clips; other rates are resampled, loud clips clipped
    both = scorer.score([clean, noisy])
    assert both == pytest.approx({k: (good[k] + bad[k]) / 2 for k in good}, abs=1e-4)
    native = speak(SENTENCE, "female_professional", "neutral", sample_rate=22050)
    at_22k = scorer.score_clip(0.5 * native / np.abs(native).max(), 22050)
    assert at_22k["distillmos"] == pytest.approx(good["distillmos"], abs=0.3)
    too_loud = scorer.score_clip(clean * 8.0, 16000)  # well past full scale: clipped, then scored
    assert too_loud == pytest.approx(scorer.score_clip(np.clip(clean * 8.0, -1.0, 1.0), 16000))
    assert too_loud != pytest.approx(good, abs=0.01)


def test_unknown_predictor_is_refused() -> None:
    with pytest.raises(ValueError, match="known ones are dnsmos, distillmos"):
        MosScorer(["dnsmos", "pesq"])


@pytest.mark.parametrize("seconds", [0.0, 0.1])
def test_empty_or_short_clip_is_refused(seconds: float) -> None:
    scorer = MosScorer(["distillmos"])
    with pytest.raises(ValueError, match="empty|too short"):
        scorer.score_clip(np.zeros(int(seconds * 16000), np.float32), 16000)
    assert scorer._loaded == {}  # refused before any model was loaded
