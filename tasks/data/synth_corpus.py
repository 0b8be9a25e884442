"""The embedded corpus: Telugu conversations spoken by espeak-ng, shaped like downloaded media.

Why synthetic: the pipeline must run end to end on one machine with no network and no accounts.
espeak-ng speaks Telugu (`-v te`); its voice variants and pitch make the checklist's 4 speakers,
and prosody settings (rate, pitch, range, amplitude, word gaps, an interjection) make its 9
emotions. Episodes are long recordings in which two speakers alternate, with pauses and
background noise, stored in the containers real sources come in (WAV, FLAC, MP3, Opus), plus a
few deliberately bad items the quality checks must catch. Ground truth (who spoke when, text,
emotion) is written beside each episode for the tests and `s2s bench segment`, and sources.yaml
lists the episodes by file:// URL, as any other source is listed, each with its transcript (the
truth file, which the data flow turns into the manifest's `text` column).
"""

from __future__ import annotations

import io
import json
import itertools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import soundfile as sf
import yaml
from tqdm import tqdm

from core import atomic
from core.config import Params
from core.hashing import code_hash
from core.labels import EMOTIONS, SPEAKERS
from tasks.data.pinned_numerics import ffmpeg_args, pinned

LICENCE = "CC0-1.0: text written for this project, speech synthesized with espeak-ng (GPL-3.0 program)"


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: the `te` language with a variant (timbre) and a base pitch (0-99)."""

    variant: str
    pitch: int
    words_per_minute: int


@dataclass(frozen=True)
class Prosody:
    """How an emotion changes a voice: rate and pitch factors, SSML pitch range, loudness,
    extra gap between words (10 ms units) and an optional interjection before the sentence."""

    rate: float
    pitch_shift: int
    pitch_range: str
    amplitude: int
    word_gap: int
    interjection: str = ""


VOICES: dict[str, Voice] = {
    "male_young": Voice(variant="m3", pitch=48, words_per_minute=165),
    "male_mature": Voice(variant="m1", pitch=22, words_per_minute=140),
    "female_young": Voice(variant="f3", pitch=78, words_per_minute=170),
    "female_professional": Voice(variant="f1", pitch=60, words_per_minute=150),
}

PROSODY: dict[str, Prosody] = {
    "neutral": Prosody(rate=1.0, pitch_shift=0, pitch_range="medium", amplitude=100, word_gap=0),
    "happy": Prosody(rate=1.1, pitch_shift=8, pitch_range="high", amplitude=115, word_gap=0),
    "laugh": Prosody(rate=1.15, pitch_shift=10, pitch_range="x-high", amplitude=115, word_gap=0,
                     interjection="హహ్హహ్హా!"),
    "excited": Prosody(rate=1.3, pitch_shift=14, pitch_range="x-high", amplitude=135, word_gap=0),
    "empathy": Prosody(rate=0.82, pitch_shift=-6, pitch_range="low", amplitude=80, word_gap=1),
    "surprise": Prosody(rate=1.05, pitch_shift=16, pitch_range="x-high", amplitude=120, word_gap=0,
                        interjection="అరే!"),
    "thinking": Prosody(rate=0.78, pitch_shift=-3, pitch_range="x-low", amplitude=90, word_gap=4,
                        interjection="అమ్మ్..."),
    "telugu_heavy_accent": Prosody(rate=0.9, pitch_shift=-2, pitch_range="x-high", amplitude=105,
                                   word_gap=3),
    "telugu_mild_accent": Prosody(rate=1.0, pitch_shift=2, pitch_range="high", amplitude=100,
                                  word_gap=1),
}

DIALOGUES = Path(__file__).with_name("telugu_dialogues.yaml")
MEDIA_FORMATS: tuple[str, ...] = ("wav", "flac", "mp3", "ogg")


@dataclass(frozen=True)
class Exchange:
    id: str
    topic: str
    prompt: str
    reply: str


@dataclass(frozen=True)
class EpisodePlan:
    """What one episode holds before it is rendered."""

    id: str
    speakers: tuple[str, str]
    emotion: str
    exchanges: tuple[Exchange, ...]
    snr_db: float
    media_format: str
    defect: str | None = None  # clipping | too_quiet | low_snr | truncated


def load_exchanges() -> list[Exchange]:
    """The project's Telugu dialogues (tasks/data/telugu_dialogues.yaml)."""
    text = DIALOGUES.read_text(encoding="utf-8")
    return [Exchange(**{k: e[k] for k in ("id", "topic", "prompt", "reply")})
            for e in yaml.safe_load(text)["exchanges"]]


def spoken_text(text: str, emotion: str) -> str:
    """What is said: the sentence, after the emotion's interjection if it has one."""
    return f"{PROSODY[emotion].interjection} {text}".strip()


def espeak_command(text: str, speaker: str, emotion: str) -> list[str]:
    voice, prosody = VOICES[speaker], PROSODY[emotion]
    pitch = int(np.clip(voice.pitch + prosody.pitch_shift, 0, 99))
    spoken = spoken_text(text, emotion)
    ssml = f'<speak><prosody range="{prosody.pitch_range}">{escape(spoken)}</prosody></speak>'
    return [
        "espeak-ng", "-v", f"te+{voice.variant}", "-m", "--stdout",
        "-p", str(pitch), "-s", str(round(voice.words_per_minute * prosody.rate)),
        "-a", str(prosody.amplitude), "-g", str(prosody.word_gap), ssml,
    ]


def render_turn(text: str, speaker: str, emotion: str, sample_rate: int) -> np.ndarray:
    """One sentence as float32 audio, trimmed to its voiced extent so truth boundaries are exact."""
    result = subprocess.run(espeak_command(text, speaker, emotion), capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"espeak-ng failed on {text!r}: {result.stderr.decode(errors='replace')}")
    audio, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    if rate != sample_rate:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz audio, corpus.sample_rate is {sample_rate}")
    loud = np.flatnonzero(np.abs(audio) > 10 ** (-45 / 20) * np.abs(audio).max())
    return audio[loud[0]: loud[-1] + 1] if loud.size else audio


def background_noise(n: int, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """Room-like noise: pink-ish broadband noise plus a faint mains hum, unit power."""
    white = rng.standard_normal(n)
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    spectrum /= np.sqrt(np.maximum(freqs, 20.0))
    pink = np.fft.irfft(spectrum, n)
    hum = 0.3 * np.sin(2 * np.pi * 50 * np.arange(n) / sample_rate + rng.uniform(0, 2 * np.pi))
    noise = pink / pink.std() + hum
    return (noise / noise.std()).astype(np.float32)


def plan_episodes(params: Params, exchanges: list[Exchange]) -> list[EpisodePlan]:
    """Deterministic episode plans: speaker pairs and emotions cycle so every one is covered."""
    cfg = params.corpus
    rng = np.random.default_rng(cfg.seed)
    speaker_pairs = list(itertools.permutations(SPEAKERS, 2))
    order = rng.permutation(len(exchanges))
    pool = itertools.cycle([exchanges[i] for i in order])
    plans: list[EpisodePlan] = []
    for index in range(cfg.episodes):
        plans.append(EpisodePlan(
            id=f"ep{index + 1:02d}",
            speakers=speaker_pairs[(index * 5) % len(speaker_pairs)],
            emotion=EMOTIONS[index % len(EMOTIONS)],
            exchanges=tuple(next(pool) for _ in range(cfg.exchanges_per_episode)),
            snr_db=cfg.noise_snr_db[index % len(cfg.noise_snr_db)],
            media_format=MEDIA_FORMATS[index % len(MEDIA_FORMATS)],
        ))
    if cfg.bad_items:
        for index, (defect, snr) in enumerate(
            [("clipping", 30.0), ("too_quiet", 30.0), ("low_snr", 2.0), ("truncated", 30.0)]
        ):
            plans.append(EpisodePlan(
                id=f"bad_{defect}",
                speakers=speaker_pairs[(index * 7 + 3) % len(speaker_pairs)],
                emotion=EMOTIONS[(index * 4) % len(EMOTIONS)],
                exchanges=tuple(next(pool) for _ in range(4)),
                snr_db=snr,
                media_format="wav",
                defect=defect,
            ))
    return plans


def render_episode(plan: EpisodePlan, params: Params) -> tuple[np.ndarray, list[dict]]:
    """Mix one episode: the turns with their pauses, then noise at the planned SNR."""
    cfg = params.corpus
    sr = cfg.sample_rate
    rng = np.random.default_rng([cfg.seed, int.from_bytes(plan.id.encode(), "little") % 2**32])
    pieces: list[np.ndarray] = [np.zeros(int(cfg.lead_silence_s * sr), np.float32)]
    cursor = len(pieces[0])
    turns: list[dict] = []
    for k, exchange in enumerate(plan.exchanges):
        first, second = plan.speakers if k % 2 == 0 else plan.speakers[::-1]
        for role, text, speaker in (("prompt", exchange.prompt, first), ("reply", exchange.reply, second)):
            audio = render_turn(text, speaker, plan.emotion, sr)
            turns.append({
                "start": cursor / sr, "end": (cursor + len(audio)) / sr, "speaker": speaker,
                "emotion": plan.emotion, "text": spoken_text(text, plan.emotion), "exchange": exchange.id, "role": role,
            })
            gap_range = cfg.turn_gap_s if role == "prompt" else cfg.exchange_gap_s
            gap = np.zeros(int(rng.uniform(*gap_range) * sr), np.float32)
            pieces += [audio, gap]
            cursor += len(audio) + len(gap)
    speech = np.concatenate(pieces)
    active = np.zeros(len(speech), bool)
    for t in turns:
        active[int(t["start"] * sr): int(t["end"] * sr)] = True
    speech_power = float(np.mean(speech[active] ** 2))
    speech *= np.sqrt(10 ** (-20 / 10) / speech_power)  # speech at -20 dBFS RMS while active
    noise = background_noise(len(speech), rng, sr) * np.sqrt(10 ** (-20 / 10) / 10 ** (plan.snr_db / 10))
    mix = speech + noise
    if plan.defect == "clipping":
        mix = np.clip(mix * 8.0, -1.0, 1.0)
    elif plan.defect == "too_quiet":
        mix *= 10 ** (-40 / 20)  # speech at -60 dBFS as recorded: a muted or far-away microphone
    return mix.astype(np.float32), turns


def write_media(audio: np.ndarray, sample_rate: int, target: Path, media_format: str) -> None:
    """Store an episode in its container through ffmpeg (WAV directly), atomically."""
    if media_format == "wav":
        atomic.write_wav(target, audio, sample_rate)
        return
    codec = {"flac": ["-c:a", "flac"], "mp3": ["-c:a", "libmp3lame", "-b:a", "96k"],
             "ogg": ["-c:a", "libopus", "-b:a", "48k"]}[media_format]
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    with atomic.atomic_path(target, suffix=f".{media_format}") as tmp:
        subprocess.run(
            ["ffmpeg", "-v", "error", *ffmpeg_args(), "-y", "-f", "s16le", "-ar", str(sample_rate), "-ac", "1",
             "-i", "pipe:0", *codec, str(tmp)],
            input=pcm, check=True, capture_output=True,
        )


def truncate_file(path: Path, keep_fraction: float = 0.35) -> None:
    """Cut a file's bytes short, leaving its header's declared length: a broken download."""
    data = path.read_bytes()
    with atomic.atomic_path(path, suffix=path.suffix) as tmp:
        tmp.write_bytes(data[: int(len(data) * keep_fraction)])


@pinned()
def synthesize(params: Params, out_dir: Path | None = None) -> Path:
    """Render every episode, its ground truth and sources.yaml; return the sources.yaml path.

    Deterministic for a given seed, so re-running gives byte-identical media and the download
    archive (and DVC) see nothing new.
    """
    out_dir = Path(out_dir) if out_dir else params.path(params.corpus.out_dir)
    media_dir, truth_dir = out_dir / "media", out_dir / "truth"
    sources_file = out_dir / "sources.yaml"
    exchanges = load_exchanges()
    stamp_path, stamp = out_dir / ".stamp.json", {
        "corpus": params.corpus.model_dump(mode="json", exclude={"out_dir"}),
        "exchanges": [e.__dict__ for e in exchanges], "code": code_hash(sys.modules[__name__]),
    }
    if sources_file.is_file() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return sources_file  # same settings and text: the media on disk are what we would render
    plans = plan_episodes(params, exchanges)
    sources: list[dict] = []

    def build(plan: EpisodePlan) -> dict:
        audio, turns = render_episode(plan, params)
        target = media_dir / f"{plan.id}.{plan.media_format}"
        write_media(audio, params.corpus.sample_rate, target, plan.media_format)
        if plan.defect == "truncated":
            truncate_file(target)
        first_appearance = list(dict.fromkeys(t["speaker"] for t in turns))
        atomic.write_json(truth_dir / f"{plan.id}.json", {
            "id": plan.id, "duration_s": len(audio) / params.corpus.sample_rate,
            "snr_db": plan.snr_db, "defect": plan.defect, "emotion": plan.emotion,
            "speakers": first_appearance, "turns": turns,
        })
        return {
            "id": plan.id, "url": target.resolve().as_uri(), "licence": LICENCE,
            "speakers": first_appearance, "emotion": plan.emotion,
            "transcript": f"truth/{plan.id}.json",
        }

    with ThreadPoolExecutor(max_workers=4) as pool:
        for entry in tqdm(pool.map(build, plans), total=len(plans), desc="synth episodes", unit="ep"):
            sources.append(entry)
    header = ("# Generated by `s2s corpus synth`: the embedded corpus, listed like any other source.\n"
              "# speakers: checklist speaker names in order of first appearance; emotion: the style.\n")
    atomic.write_text(sources_file, header + yaml.safe_dump({"sources": sources}, allow_unicode=True,
                                                            sort_keys=False))
    atomic.write_json(stamp_path, stamp)
    return sources_file
