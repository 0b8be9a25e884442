"""A small held-out set of voices and sentences the corpus never uses, for scoring generalisation.

The test split shares its speakers and its sentence pool with training, so a codec (or a model)
can score well there by memory. This set is spoken by espeak-ng voice variants that no corpus
speaker uses (m2, m4, f2, f4, at other pitches) saying sentences written for it, normalised the
way the data flow normalises recordings (16 kHz, -23 LUFS capped by a -2 dBFS peak), with no
background noise, so its silences are digital silence: the hardest case for a level-based front end.
"""

from __future__ import annotations

import io
import subprocess

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

UNSEEN_VOICES = {"m2": 35, "m4": 58, "f2": 70, "f4": 88}   # espeak-ng variant -> base pitch (0-99)
UNSEEN_SENTENCES = (
    "ఈ రోజు వాతావరణం చాలా బాగుంది.",
    "మా ఊరిలో పెద్ద చెరువు ఉంది.",
    "రేపు ఉదయం రైలు ఎనిమిది గంటలకు బయలుదేరుతుంది.",
    "నేను ప్రతి సాయంత్రం పుస్తకం చదువుతాను.",
    "ఆ దుకాణంలో తాజా కూరగాయలు దొరుకుతాయి.",
    "పిల్లలు పార్కులో ఆడుకుంటున్నారు.",
    "దయచేసి తలుపు మూసివేయండి.",
    "మీ అమ్మగారు ఎలా ఉన్నారు?",
    "ఈ సినిమా మూడు గంటల పాటు సాగింది.",
    "వర్షం వల్ల రోడ్లు తడిసిపోయాయి.",
    "మా అన్నయ్య హైదరాబాద్‌లో పని చేస్తాడు.",
    "కాఫీలో కొంచెం చక్కెర వేయండి.",
)


def render(text: str, variant: str, pitch: int, sample_rate: int = 16000, lufs: float = -23.0,
           peak_db: float = -2.0, words_per_minute: int = 150) -> np.ndarray:
    """One sentence in one espeak-ng voice variant, as float32 audio at `sample_rate`,
    loudness-normalised the way the data flow normalises recordings."""
    cmd = ["espeak-ng", "-v", f"te+{variant}", "--stdout", "-p", str(pitch), "-s", str(words_per_minute), text]
    result = subprocess.run(cmd, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"espeak-ng failed on {text!r} ({variant}): {result.stderr.decode(errors='replace')}")
    audio, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    x = AF.resample(torch.from_numpy(audio)[None], rate, sample_rate)
    loudness = float(AF.loudness(x, sample_rate))
    peak = 20 * np.log10(float(x.abs().max()) + 1e-9)
    gain = 10 ** (min(lufs - loudness, peak_db - peak) / 20)
    return (x[0] * gain).clamp(-1, 1).numpy()


def unseen_set(items: int | None = None, sample_rate: int = 16000) -> list[tuple[str, np.ndarray]]:
    """(name, audio) pairs: sentences cycled over the voices, `items` of them (all 48 by default)."""
    pairs = [(variant, pitch, i, text) for i, text in enumerate(UNSEEN_SENTENCES)
             for variant, pitch in UNSEEN_VOICES.items()]
    # Interleave so that any prefix covers every voice and as many sentences as it can.
    pairs.sort(key=lambda p: (p[2] + list(UNSEEN_VOICES).index(p[0])) % len(UNSEEN_SENTENCES))
    return [(f"{variant}-s{i:02d}", render(text, variant, pitch, sample_rate))
            for variant, pitch, i, text in pairs[:items]]
