"""The judges' ceiling on every voice control: the test replies spoken by espeak-ng in each control.

The corpus's test split holds 2 of the 9 emotions (one emotion per episode, 2 episodes held out),
so "emotion recognised" on corpus audio says nothing of the other 7: a reply that sounds exactly
like the corpus would sound in an emotion can only be credited with it when the emotion judge
recognises that emotion at all. Here each test reply's sentence is spoken again by espeak-ng, as
the corpus speaks it (tasks/training/reply_renderings.render_reply: same voices, prosody, room
noise and levels), in exactly the controls the replies are asked for. Judged like the replies,
its emotions and speakers "working" are the most the judges can credit a perfect model with, and
its intelligibility CER the recognizer's floor on the words with their interjections.

These clips are never a training target of the S2S model (they are test-split sentences) and the
judges never learn from them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from core.config import Params
from tasks.data.synth_corpus import PROSODY
from tasks.training.reply_renderings import render_reply, sentence_of


def spoken_text(sentence: str, emotion: str) -> str:
    """What a rendering of `sentence` in `emotion` says: the emotion's interjection, then the sentence."""
    return f"{PROSODY[emotion].interjection} {sentence}".strip()


def render_controls(params: Params, reply_text: str, controls: list[tuple[str, str]],
                    seed: int) -> list[tuple[np.ndarray, str]]:
    """(audio at 16 kHz, text it says) of the reply's sentence in each (speaker, emotion) of
    `controls`, 4 espeak-ng processes at a time, deterministic in `seed`. Room noise cycles over the
    corpus's SNRs as the corpus's own episodes do."""
    sentence = sentence_of(reply_text)
    if not sentence:
        raise ValueError(f"reply text {reply_text!r} has no sentence to render")
    snrs = list(params.corpus.noise_snr_db)

    def speak(index: int) -> np.ndarray:
        speaker, emotion = controls[index]
        return render_reply(sentence, speaker, emotion, params.corpus.sample_rate, snrs[index % len(snrs)],
                            seed=seed * 1_000 + index)

    with ThreadPoolExecutor(max_workers=4) as pool:
        audio = list(pool.map(speak, range(len(controls))))
    return [(clip, spoken_text(sentence, emotion)) for clip, (_, emotion) in zip(audio, controls)]
