"""Renderings for the judges: corpus sentences spoken by espeak-ng in every voice and emotion.

In the corpus an emotion comes from one or two episodes, each spoken by one pair of speakers, so
the emotion judge hears each emotion in two voices and a few dozen sentences, and learns "this
episode" as much as "this emotion": on clean renderings of the test replies it never recognised
neutral and confused the two accents (docs/history.md). Here the judge's training split also gets
clips in all 4 x 9 (speaker, emotion) controls, spoken as the corpus speaks them
(tasks/training/reply_renderings.render_reply: the corpus's voices, prosody, room noise and
levels), so every emotion is heard in every voice and the speaker no longer gives it away.

What keeps the judge honest:
- its renderings say only sentences that no val or test segment speaks, so the quality
  evaluation's renderings of the test replies (the judges' ceiling) and the held-out check below
  never share a sentence with what the judge learnt from;
- the held-out check is renderings of the val split's sentences in all 36 controls, scored like
  the val and test splits (which hold only 2 emotions each), so the judge's accuracy on all 9
  emotions is measured before it judges anything;
- the S2S model trains on renderings of the train replies too (s2s_train.reply_renderings): the
  judge and the model share the rendering recipe (the corpus's own), never a target: the judge
  never hears a generated reply, and the model never sees the judge.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.config import Params
from core.labels import EMOTIONS, SPEAKERS
from tasks.training.reply_renderings import render_reply, sentence_of


@dataclass(frozen=True)
class RenderedClip:
    """One clip to render: what it says, in which control, and its noise."""

    sentence: str
    speaker: str
    emotion: str
    snr_db: float
    seed: int


def split_sentences(manifest: pd.DataFrame) -> dict[str, set[str]]:
    """The sentences (interjections removed) each split's segments speak."""
    rows = manifest[manifest["text"].notna()] if "text" in manifest else manifest.iloc[:0]
    return {split: {s for s in map(sentence_of, rows[rows["split"] == split]["text"].astype(str)) if s}
            for split in ("train", "val", "test")}


def plan_clips(sentences: list[str], per_control: int, snrs: list[float], seed: int) -> list[RenderedClip]:
    """`per_control` clips for each (speaker, emotion): sentences drawn without repeats within a
    control (cycling when there are fewer), room noise cycling over the corpus's SNRs."""
    if per_control < 0:
        raise ValueError(f"renderings per control must be 0 or more, got {per_control}")
    if per_control and not sentences:
        raise ValueError("no sentence to render: every corpus sentence is spoken in the val or test split")
    rng = np.random.default_rng(seed)
    plan = []
    for speaker in SPEAKERS:
        for emotion in EMOTIONS:
            order = rng.permutation(len(sentences))
            for k in range(per_control):
                index = len(plan)
                plan.append(RenderedClip(sentences[int(order[k % len(order)])], speaker, emotion,
                                         snrs[index % len(snrs)], seed * 100_003 + index))
    return plan


def render_clips(plan: list[RenderedClip], params: Params) -> list[np.ndarray]:
    """int16 clips at 16 kHz (as the corpus stores them), 4 espeak-ng processes at a time."""
    def speak(clip: RenderedClip) -> np.ndarray:
        audio = render_reply(clip.sentence, clip.speaker, clip.emotion, params.corpus.sample_rate, clip.snr_db,
                             clip.seed)
        return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(speak, plan))


def judge_training_clips(params: Params, manifest: pd.DataFrame, per_control: int,
                         seed: int) -> tuple[list[RenderedClip], list[np.ndarray]]:
    """The judge's extra training clips: train-split sentences no val or test segment speaks."""
    by_split = split_sentences(manifest)
    pool = sorted(by_split["train"] - by_split["val"] - by_split["test"])
    if not pool:
        print("judge renderings: none, every train sentence is spoken in the val or test split too "
              "(the judge learns from the corpus alone)", flush=True)
        return [], []
    plan = plan_clips(pool, per_control, list(params.corpus.noise_snr_db), seed)
    return plan, render_clips(plan, params)


def held_out_clips(params: Params, manifest: pd.DataFrame, per_control: int,
                   seed: int) -> tuple[list[RenderedClip], list[np.ndarray]]:
    """The held-out check: the val split's sentences in every control (none of them is in the
    judge's renderings; the test split's are left to the quality evaluation's ceiling)."""
    by_split = split_sentences(manifest)
    pool = sorted(by_split["val"] - by_split["test"])
    if not pool:
        print("judges' held-out renderings: skipped, every val sentence is a test sentence too", flush=True)
        return [], []
    plan = plan_clips(pool, per_control, list(params.corpus.noise_snr_db), seed + 1)
    return plan, render_clips(plan, params)
