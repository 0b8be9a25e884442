"""More renderings of each training reply: the same words in other voices and emotions.

The embedded corpus gives each (speaker, emotion) only a handful of training replies and never the
same reply in two emotions (one emotion per episode). The S2S model then learns its pairs by heart
(validation cross-entropy turns upward after ~800 steps) before it learns to follow the voice
controls. Here each training reply's sentence is spoken again by espeak-ng with the corpus's own
voices and prosody (tasks/data/synth_corpus), in (speaker, emotion) combinations the pair does not
have, mixed and levelled like a corpus recording, then encoded by the codec and aligned by the text
stream's aligner as a corpus reply is. Same prompt, same words, another control: the contrast that
teaches the control. Only the train split is augmented; validation and test stay the corpus's own,
so the figures still measure generalisation to real pairs.

The renderings are cached beside the tokens, keyed by everything they depend on.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from core import atomic
from core.config import Params
from core.hashing import code_hash, file_sha256
from core.labels import EMOTIONS, SPEAKERS, emotion_id, speaker_id
from models.asr import CtcRecognizer, load_recognizer
from models.codecs import Codec
from tasks.data.corpus_audio import read_manifest
from tasks.data.synth_corpus import PROSODY, background_noise, render_turn
from tasks.training.align_corpus import Segment, align_segment

SAMPLE_RATE = 16000
EDGE_S = 0.12          # noise before and after the words, as a segmenter's cut leaves some


@dataclass(frozen=True)
class Rendering:
    """One extra reply: which training pair it answers, in which voice, and its codes and text."""

    input_segment: str
    speaker: str
    emotion: str
    codes: np.ndarray             # (K, F) int16
    text: np.ndarray | None       # (F',) int16 character per frame, None when the aligner failed


def sentence_of(spoken: str) -> str:
    """The reply's sentence without the interjection its emotion put before it."""
    for prosody in PROSODY.values():
        if prosody.interjection and spoken.startswith(prosody.interjection):
            return spoken[len(prosody.interjection):].strip()
    return spoken.strip()


def plan_renderings(pairs: list[dict], texts: dict[str, str], per_pair: int, seed: int) -> list[tuple]:
    """(input_segment, sentence, speaker, emotion) for `per_pair` new controls of each train pair:
    another speaker than the user's, a (speaker, emotion) the pair does not have, drawn so that
    every emotion and speaker gets about the same share. Pairs without a transcript are skipped."""
    rng = np.random.default_rng(seed)
    plan = []
    for row in pairs:
        sentence = sentence_of(texts.get(row["reply_segment"], ""))
        if not sentence:
            continue
        combos = [(s, e) for s in SPEAKERS for e in EMOTIONS
                  if s != row.get("input_speaker") and (s, e) != (row["reply_speaker"], row["reply_emotion"])]
        for index in rng.permutation(len(combos))[:per_pair]:
            speaker, emotion = combos[int(index)]
            plan.append((row["input_segment"], sentence, speaker, emotion))
    return plan


def render_reply(sentence: str, speaker: str, emotion: str, corpus_rate: int, snr_db: float,
                 seed: int) -> np.ndarray:
    """The sentence (after its emotion's interjection) as a corpus reply segment sounds: speech at
    -20 dBFS RMS, room noise at `snr_db`, 16 kHz, -23 LUFS capped by a -2 dBFS peak (the data
    flow's normalisation), with a little noise before and after the words."""
    speech = render_turn(sentence, speaker, emotion, corpus_rate)
    speech = speech * np.sqrt(10 ** (-20 / 10) / max(float(np.mean(speech ** 2)), 1e-12))
    edge = np.zeros(int(EDGE_S * corpus_rate), np.float32)
    speech = np.concatenate([edge, speech, edge])
    noise = background_noise(len(speech), np.random.default_rng(seed), corpus_rate)
    mix = torch.from_numpy((speech + noise * np.sqrt(10 ** (-20 / 10) / 10 ** (snr_db / 10))).astype(np.float32))
    x = AF.resample(mix[None], corpus_rate, SAMPLE_RATE)
    gain_db = min(-23.0 - float(AF.loudness(x, SAMPLE_RATE)), -2.0 - 20 * np.log10(float(x.abs().max()) + 1e-9))
    return (x[0] * 10 ** (gain_db / 20)).clamp(-1, 1).numpy()


def render_all(plan: list[tuple], params: Params, codec: Codec, aligner: CtcRecognizer | None) -> list[Rendering]:
    """Speak (espeak-ng subprocesses, 4 at a time), encode and align every planned reply."""
    cfg = params.corpus
    snrs = list(cfg.noise_snr_db)

    def speak(item: tuple[int, tuple]) -> np.ndarray:
        index, (_, sentence, speaker, emotion) = item
        return render_reply(sentence, speaker, emotion, cfg.sample_rate, snrs[index % len(snrs)],
                            seed=params.s2s_train.seed * 100_003 + index)

    out: list[Rendering] = []
    with ThreadPoolExecutor(max_workers=4) as pool, torch.inference_mode():
        audio = pool.map(speak, enumerate(plan))
        for (input_segment, sentence, speaker, emotion), clip in tqdm(zip(plan, audio), total=len(plan),
                                                                      desc="render replies", unit="reply"):
            codes = codec.encode(torch.from_numpy(clip)[None, None])[0].numpy().astype(np.int16)
            spoken = f"{PROSODY[emotion].interjection} {sentence}".strip()
            text = align_segment(aligner, Segment(input_segment, "train", spoken, clip)) if aligner else None
            out.append(Rendering(input_segment, speaker, emotion, codes, text))
    return out


def reply_renderings(params: Params, tokens_dir: Path, align_dir: Path | None, codec: Codec) -> list[Rendering]:
    """The train split's extra replies (params.s2s_train.reply_renderings per pair), made once;
    with `align_dir` (a text stream) each with its character per frame."""
    per_pair = params.s2s_train.reply_renderings
    if per_pair <= 0:
        return []
    data_dir = params.path(params.paths.data)
    pairs = [row for row in map(json.loads, (data_dir / "pairs.jsonl").read_text().splitlines())
             if row["split"] == "train"]
    aligner_path = align_dir / "aligner.pt" if align_dir is not None else None
    key = {"per_pair": per_pair, "seed": params.s2s_train.seed, "tokens": json.loads((tokens_dir / "stamp.json").read_text()),
           "pairs": file_sha256(data_dir / "pairs.jsonl"), "corpus": params.corpus.model_dump(mode="json"),
           "aligner": file_sha256(aligner_path) if aligner_path is not None else None,
           "code": code_hash(sys.modules[__name__])}
    cache = tokens_dir / "renderings"
    if (cache / "key.json").is_file() and json.loads((cache / "key.json").read_text()) == key:
        return load_renderings(cache)
    manifest = read_manifest(data_dir)
    texts = dict(zip(manifest["segment_id"], manifest["text"].astype(str))) if "text" in manifest else {}
    aligner = load_recognizer(aligner_path) if aligner_path is not None else None
    plan = plan_renderings(pairs, texts, per_pair, params.s2s_train.seed)
    renderings = render_all(plan, params, codec, aligner)
    with atomic.atomic_dir(cache) as tmp:
        np.savez(tmp / "codes.npz", *[r.codes for r in renderings])
        np.savez(tmp / "text.npz", *[r.text if r.text is not None else np.zeros(0, np.int16) for r in renderings])
        atomic.write_json(tmp / "index.json", [[r.input_segment, r.speaker, r.emotion] for r in renderings])
        atomic.write_json(tmp / "key.json", key)
    return renderings


def load_renderings(cache: Path) -> list[Rendering]:
    index = json.loads((cache / "index.json").read_text())
    with np.load(cache / "codes.npz") as codes, np.load(cache / "text.npz") as text:
        return [Rendering(seg, spk, emo, codes[f"arr_{i}"], text[f"arr_{i}"] if text[f"arr_{i}"].size else None)
                for i, (seg, spk, emo) in enumerate(index)]


def control_ids(rendering: Rendering) -> tuple[int, int]:
    return speaker_id(rendering.speaker), emotion_id(rendering.emotion)
