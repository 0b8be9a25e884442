"""Codec-only training speech: espeak-ng voices that neither the corpus nor the unseen set uses.

The corpus has four speakers, so a codec fitted on it alone learns four voices: on the
unseen-voices set its quantizer error was three times the test split's. The codec (not the S2S
model, not the judges) may learn from any speech, so it also hears other espeak-ng variants at
random pitches and rates, clean (digital silence included), saying the corpus's sentences. The
unseen set's variants (m2, m4, f2, f4) and sentences are never used here, so it stays unseen.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tasks.data.synth_corpus import load_exchanges
from tasks.evaluation.unseen_voices import UNSEEN_SENTENCES, UNSEEN_VOICES, render

# espeak-ng variants neither the corpus (m1, m3, f1, f3) nor the unseen set uses.
CORPUS_VARIANTS = ("m1", "m3", "f1", "f3")
EXTRA_VARIANTS = ("m5", "m6", "m7", "f5", "klatt", "klatt2", "klatt3", "Andy", "Annie", "Alex",
                  "Linda", "Michael", "Steph", "Lee", "Paul", "grandpa")


def extra_voice_clips(count: int, seed: int, sample_rate: int = 16000) -> list[np.ndarray]:
    """`count` int16 clips, each a corpus sentence in an extra variant at a random pitch (10-95)
    and rate (120-190 words/min), normalised like the data flow's recordings. Deterministic."""
    if count <= 0:
        return []
    assert not set(EXTRA_VARIANTS) & (set(CORPUS_VARIANTS) | set(UNSEEN_VOICES)), "a held-out voice leaked in"
    sentences = sorted({text for e in load_exchanges() for text in (e.prompt, e.reply)} - set(UNSEEN_SENTENCES))
    rng = np.random.default_rng(seed)
    plan = [(sentences[int(rng.integers(len(sentences)))], EXTRA_VARIANTS[i % len(EXTRA_VARIANTS)],
             int(rng.integers(10, 96)), int(rng.integers(120, 191))) for i in range(count)]

    def one(item: tuple[str, str, int, int]) -> np.ndarray:
        text, variant, pitch, rate = item
        audio = render(text, variant, pitch, sample_rate, words_per_minute=rate)
        return np.round(audio * 32767.0).astype(np.int16)

    with ThreadPoolExecutor(max_workers=4) as pool:  # espeak-ng runs as subprocesses
        return list(pool.map(one, plan))
