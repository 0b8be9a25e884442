"""Train an utterance classifier (emotion or speaker) on the corpus's labels, then score it on
held-out audio.

These classifiers are judges: the quality evaluation asks them whether a generated reply has the
emotion or speaker it was asked for, so what matters is how they do on audio they never saw. They
are trained on random crops of the train split and scored on the val and test splits' whole
clips. Splits are by episode and an episode has one emotion, so a held-out split may hold only a
few of the labels: the result says which (`coverage`), beside the accuracy and the test confusion
matrix.

Why the augmentations (params: evaluation.classifier.<label>). In the corpus an emotion comes
from one or two episodes, each spoken by one pair of speakers with its own noise floor and media
codec, so a plain emotion classifier learns "this episode" (speaker pair, noise) instead of "this
emotion", and fails on the same emotion spoken by other voices (docs/history.md has
the figure). A crop may therefore get
- added white-to-pink noise at a random SNR (`noise_snr_db`), which hides each episode's floor,
- a random shift along the mel axis (`mel_shift`, bins), a voice slightly higher or lower,
and the pooled embedding may feed, through gradient reversal, an adversary that tries to tell the
*other* label (the speaker, for the emotion classifier; the emotion, for the speaker one), so the
embedding unlearns it (`adversary_weight`, 0 = off). The speaker classifier needs none of these
(they cost it held-out accuracy). Every crop gets a random gain (`gain_db`; the model is
level-blind anyway, see models/utterance_classifier.py), and batches are class-balanced: every
label as often, whatever its count.

Why the renderings (`rendered_per_control`, tasks/evaluation/judge_renderings.py). The
augmentations only blur the episode; the emotion judge still hears each emotion in one or two
speaker pairs and a few dozen sentences, and on clean espeak-ng renderings it never recognised
neutral and confused the two accents. So its train split can also get clips of every (speaker,
emotion) control, spoken by espeak-ng exactly as the corpus speaks them (the recipe of
tasks/training/reply_renderings.py, which the S2S model's training also uses on the train
replies). The judge's clips say only train sentences that no val or test segment speaks, so the
held-out check (val sentences in all 36 controls, `heldout_per_control`, scored as "rendered") and
the quality evaluation's ceiling (test replies' sentences) never share a sentence with what the
judge learnt. What they do share with its training is the voice: the same espeak-ng voices and
prosody recipe, so the renderings measure the judge on the corpus's way of speaking, not on
voices it never heard. The S2S model's renderings of the train replies may say sentences the judge
also heard (both draw on the train split); neither says a val or test sentence, and the judge
never hears a generated reply.

Read top to bottom: the stamp (corpus, settings, code) that lets a re-run reuse a finished
classifier, the batches, the step loop (AdamW, warmup + cosine learning rate, tqdm, MLflow), then
the held-out scoring and the atomic writes (checkpoint, result.json last, then the stamp).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from core import atomic
from core.config import ClassifierAugmentConfig, Params
from core.hashing import code_hash
from core.labels import EMOTIONS, SPEAKERS
from models.utterance_classifier import UtteranceClassifier, save_classifier
from tasks.data.corpus_audio import CorpusError, read_manifest
from tasks.evaluation.judge_renderings import RenderedClip, held_out_clips, judge_training_clips
from tasks.training.cost import cost_metrics
from tasks.training.provenance import corpus_fingerprint, run_tags
from tasks.training.rng import step_generator
from tasks.training.stage_cache import cached_result, write_stamp
from tasks.training.tracker import RunTracker, tracked

Label = Literal["emotion", "speaker"]
VOCABULARIES: dict[str, tuple[str, ...]] = {"emotion": EMOTIONS, "speaker": SPEAKERS}
NUISANCE = {"emotion": "speaker", "speaker": "emotion"}  # what each classifier's adversary tells
ADVERSARY_RAMP = 0.3  # the adversary's weight grows linearly over this fraction of the steps
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.01
LOG_EVERY = 20
NOISE_BANK_SECONDS = 30.0


@dataclass
class ClassifierTrainResult:
    label: str
    labels: list[str]
    checkpoint: str
    steps: int
    seconds: float
    metrics: dict[str, float]
    confusion_test: list[list[int]]  # rows: true label, columns: predicted, both in the order of `labels`
    run_id: str | None
    cached: bool = False  # True when a finished run with the same stamp was reused
    coverage: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> label -> segments


@dataclass
class LabelledSplit:
    clips: list[np.ndarray]  # int16, as stored
    targets: np.ndarray  # label index per clip
    nuisance: np.ndarray  # index of the other label (speaker for emotion, emotion for speaker)

    def coverage(self, labels: list[str]) -> dict[str, int]:
        counts = np.bincount(self.targets, minlength=len(labels))
        return {labels[i]: int(c) for i, c in enumerate(counts) if c}


def rendered_split(plan: list[RenderedClip], clips: list[np.ndarray], label: str) -> LabelledSplit:
    """Rendered clips as a split: each one's control gives its label and nuisance label."""
    def indices(column: str) -> np.ndarray:
        return np.array([VOCABULARIES[column].index(getattr(clip, column)) for clip in plan], dtype=np.int64)

    return LabelledSplit(list(clips), indices(label), indices(NUISANCE[label]))


def joined(a: LabelledSplit, b: LabelledSplit) -> LabelledSplit:
    return LabelledSplit(a.clips + b.clips, np.concatenate([a.targets, b.targets]),
                         np.concatenate([a.nuisance, b.nuisance]))


def load_split(data_dir: Path, split: str, label: str) -> LabelledSplit:
    """int16 clips of one split (sorted by segment id), each one's label and nuisance label."""
    import soundfile as sf

    rows = read_manifest(data_dir)
    rows = rows[rows["split"] == split].sort_values("segment_id")
    if rows.empty:
        raise CorpusError(f"the corpus at {data_dir} has no segments in split {split!r}")
    indices = {}
    for column in (label, NUISANCE[label]):
        vocabulary = VOCABULARIES[column]
        unknown = sorted(set(rows[column]) - set(vocabulary))
        if unknown:
            raise CorpusError(f"the {split} split has {column} labels outside the vocabulary: {unknown}")
        indices[column] = np.array([vocabulary.index(v) for v in rows[column]], dtype=np.int64)
    clips = [sf.read(data_dir / path, dtype="int16")[0] for path in rows["path"]]
    return LabelledSplit(clips, indices[label], indices[NUISANCE[label]])


@dataclass
class Batch:
    audio: torch.Tensor  # (batch, samples) float, zero-padded
    lengths: torch.Tensor  # samples per row before padding
    targets: torch.Tensor
    nuisance: torch.Tensor
    mel_shift: torch.Tensor  # bins per row


def training_batch(data: LabelledSplit, batch: int, samples: int, gain_db: float, augment: ClassifierAugmentConfig,
                   generator: torch.Generator, noise: NoiseBank | None = None) -> Batch:
    """One step's batch: per row a label drawn uniformly among those present, a clip of it and a
    random crop (shorter clips zero-padded, their length kept), then a random gain, noise at a
    random SNR and a random mel shift (see the top of this module)."""
    present = np.unique(data.targets)
    by_label = {int(k): np.flatnonzero(data.targets == k) for k in present}
    audio = torch.zeros(batch, samples)
    lengths = torch.zeros(batch, dtype=torch.long)
    picks = []
    for row in range(batch):
        target = int(present[int(torch.randint(len(present), (1,), generator=generator))])
        members = by_label[target]
        pick = int(members[int(torch.randint(len(members), (1,), generator=generator))])
        clip = data.clips[pick]
        start = int(torch.randint(max(1, len(clip) - samples + 1), (1,), generator=generator))
        piece = torch.from_numpy(clip[start: start + samples].astype(np.float32) / 32768.0)
        audio[row, : len(piece)] = piece
        lengths[row] = len(piece)
        picks.append(pick)
    valid = (torch.arange(samples)[None, :] < lengths[:, None]).float()
    if augment.noise_snr_db is not None:
        low, high = augment.noise_snr_db
        snr = low + torch.rand(batch, 1, generator=generator) * (high - low)
        power = (audio ** 2).sum(1, keepdim=True) / lengths[:, None].clamp(min=1)
        noise = noise or NoiseBank(int(torch.randint(2**31, (1,), generator=generator)))
        audio = audio + noise.draw(batch, samples, generator) * torch.sqrt(power * 10 ** (-snr / 10)) * valid
    gain = (torch.rand(batch, 1, generator=generator) * 2 - 1) * gain_db
    audio = audio * 10 ** (gain / 20)
    shift = (torch.rand(batch, generator=generator) * 2 - 1) * augment.mel_shift
    picked = np.array(picks)
    return Batch(audio, lengths, torch.from_numpy(data.targets[picked]), torch.from_numpy(data.nuisance[picked]),
                 shift)


class NoiseBank:
    """White and pink noise made once (unit power, NOISE_BANK_SECONDS each); a row of noise is a
    random slice of each, mixed in a random proportion (cheaper than filtering noise per step)."""

    def __init__(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        samples = int(NOISE_BANK_SECONDS * 16000)
        white = torch.randn(samples, generator=generator)
        freqs = torch.fft.rfftfreq(samples, 1 / 16000).clamp(min=20.0)
        pink = torch.fft.irfft(torch.fft.rfft(torch.randn(samples, generator=generator)) / freqs.sqrt(), samples)
        self.bank = torch.stack([white / white.std(), pink / pink.std()])

    def draw(self, batch: int, samples: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, samples) unit-power noise, each row from white to pink."""
        if samples > self.bank.shape[1]:
            raise ValueError(f"crops of {samples} samples are longer than the noise bank")
        starts = torch.randint(self.bank.shape[1] - samples + 1, (batch, 2), generator=generator)
        pinkness = torch.rand(batch, 1, generator=generator)
        rows = torch.stack([torch.stack([self.bank[k, int(s): int(s) + samples] for k, s in enumerate(pair)])
                            for pair in starts])  # (batch, 2, samples)
        noise = (1 - pinkness) * rows[:, 0] + pinkness * rows[:, 1]
        return noise / noise.std(dim=1, keepdim=True).clamp(min=1e-8)


class _GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient times -weight backward (domain-adversarial training)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:  # noqa: ANN001
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return -ctx.weight * grad, None


def score(model: UtteranceClassifier, data: LabelledSplit) -> tuple[float, list[list[int]]]:
    """Accuracy on whole clips and the confusion matrix (rows true, columns predicted)."""
    probs = model.predict_proba(data.clips)
    predicted = probs.argmax(axis=1)
    n = len(model.labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (data.targets, predicted), 1)
    return float((predicted == data.targets).mean()), confusion.tolist()


def balanced_accuracy(confusion: list[list[int]]) -> float:
    """Mean recall over the labels the split holds (a split may hold only a few)."""
    rows = np.asarray(confusion)
    held = rows.sum(1) > 0
    return float((np.diag(rows)[held] / rows.sum(1)[held]).mean())


def learning_rate(step: int, total: int, peak: float) -> float:
    warmup = max(1, int(WARMUP_FRACTION * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def training_stamp(params: Params, label: str) -> dict:
    """Everything a finished classifier depends on: corpus, label, settings and code."""
    import models.features, models.utterance_classifier, tasks.data.corpus_audio  # noqa: E401
    import tasks.evaluation.judge_renderings, tasks.training.reply_renderings  # noqa: E401

    settings = params.evaluation.classifier.model_dump(mode="json")  # the other label's section is left out

    return {"stage": f"{label}-classifier", **corpus_fingerprint(params), "label": label,
            "classifier": {k: v for k, v in settings.items() if k not in VOCABULARIES}, "augment": settings[label],
            **({"corpus_voices": params.corpus.model_dump(mode="json")}  # what the renderings sound like
               if settings[label]["rendered_per_control"] or settings["heldout_per_control"] else {}),
            "code": code_hash(models.utterance_classifier, models.features, tasks.data.corpus_audio,
                              tasks.evaluation.judge_renderings, tasks.training.reply_renderings,
                              sys.modules[__name__])}


def train_classifier(params: Params, label: Label, force: bool = False, parent_run_id: str | None = None,
                     use_mlflow: bool = True) -> ClassifierTrainResult:
    """Train the `label` classifier (or reuse a finished one with the same stamp unless `force`)."""
    if label not in VOCABULARIES:
        raise ValueError(f"unknown classifier label {label!r}: expected one of {', '.join(VOCABULARIES)}")
    cfg = params.evaluation.classifier
    augment: ClassifierAugmentConfig = getattr(cfg, label)
    labels = list(VOCABULARIES[label])
    out_dir = params.path(params.evaluation.out_dir) / label
    checkpoint_path = out_dir / "classifier.pt"
    stamp = training_stamp(params, label)
    if not force and (cached := cached_result(out_dir, stamp)) is not None:
        return ClassifierTrainResult(**{**cached, "cached": True})
    (out_dir / "stamp.json").unlink(missing_ok=True)  # the checkpoint is about to change

    data_dir = params.path(params.paths.data)
    splits = {name: load_split(data_dir, name, label) for name in ("train", "val", "test")}
    corpus_train = len(splits["train"].clips)
    if augment.rendered_per_control or cfg.heldout_per_control:
        manifest = read_manifest(data_dir)
    if augment.rendered_per_control:
        splits["train"] = joined(splits["train"], rendered_split(
            *judge_training_clips(params, manifest, augment.rendered_per_control, cfg.seed), label))
    if cfg.heldout_per_control:
        heldout = rendered_split(*held_out_clips(params, manifest, cfg.heldout_per_control, cfg.seed), label)
        if heldout.clips:
            splits["rendered"] = heldout
    coverage = {name: split.coverage(labels) for name, split in splits.items()}
    torch.manual_seed(cfg.seed)
    model = UtteranceClassifier(labels, n_mels=cfg.n_mels, channels=cfg.channels)
    adversary = nn.Sequential(nn.Linear(2 * cfg.channels, cfg.channels), nn.ReLU(),
                              nn.Linear(cfg.channels, len(VOCABULARIES[NUISANCE[label]])))
    optimizer = torch.optim.AdamW([*model.parameters(), *adversary.parameters()], lr=cfg.lr,
                                  weight_decay=WEIGHT_DECAY)
    crop = int(cfg.crop_seconds * 16000)
    noise = NoiseBank(cfg.seed) if augment.noise_snr_db is not None else None
    total = max(1, round(cfg.max_steps * augment.steps_fraction))
    device = torch.device("cpu")  # a few hundred steps of a small conv net: the CPU is enough

    tracker = RunTracker.for_training(params, f"{label}-classifier", out_dir, True, use_mlflow, 0, None,
                                      parent_run_id)
    started = time.monotonic()
    with tracked(tracker):
        tracker.log_params({**{f"classifier.{k}": v for k, v in cfg.model_dump().items() if k not in VOCABULARIES},
                            **{f"augment.{k}": v for k, v in augment.model_dump().items()}, "label": label,
                            "labels": ",".join(labels), "profile": params.profile,
                            "items_train": len(splits["train"].clips),
                            "items_train_rendered": len(splits["train"].clips) - corpus_train, "total_steps": total})
        tracker.set_tags(run_tags(params, f"{label}-classifier"))
        bar = tqdm(total=total, desc=f"train {label} classifier", unit="step")
        model.train()
        window = {"loss": 0.0, "adversary_loss": 0.0, "correct": 0.0, "items": 0.0}
        for step in range(total):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, cfg.lr)
            batch = training_batch(splits["train"], cfg.batch_size, crop, cfg.gain_db, augment,
                                   step_generator(cfg.seed, step), noise)
            embedding = model.embed(batch.audio, batch.lengths, batch.mel_shift if augment.mel_shift else None)
            logits = model.head(embedding)
            loss = F.cross_entropy(logits, batch.targets, label_smoothing=cfg.label_smoothing)
            adversary_loss = torch.zeros(())
            if augment.adversary_weight:
                weight = augment.adversary_weight * min(1.0, step / max(1.0, ADVERSARY_RAMP * total))
                adversary_loss = F.cross_entropy(adversary(_GradientReversal.apply(embedding, weight)), batch.nuisance)
            optimizer.zero_grad(set_to_none=True)
            (loss + adversary_loss).backward()
            torch.nn.utils.clip_grad_norm_([*model.parameters(), *adversary.parameters()], 5.0)
            optimizer.step()
            bar.update(1)
            items = len(batch.targets)
            window["loss"] += float(loss.detach()) * items
            window["adversary_loss"] += float(adversary_loss.detach()) * items
            window["correct"] += int((logits.argmax(-1) == batch.targets).sum())
            window["items"] += items
            if (step + 1) % LOG_EVERY == 0 or step + 1 == total:
                logged = {"loss": window["loss"] / window["items"],
                          "adversary_loss": window["adversary_loss"] / window["items"],
                          "train_crop_accuracy": window["correct"] / window["items"],
                          "lr": optimizer.param_groups[0]["lr"]}
                tracker.log_metrics(logged, step + 1)
                bar.set_postfix(loss=f"{logged['loss']:.3f}", acc=f"{logged['train_crop_accuracy']:.2f}")
                window = dict.fromkeys(window, 0.0)
        bar.close()
        seconds = time.monotonic() - started

        confusions, metrics = {}, {}
        for name in [n for n in ("val", "test", "rendered") if n in splits]:
            accuracy, confusions[name] = score(model, splits[name])
            metrics |= {f"accuracy_{name}": accuracy, f"balanced_accuracy_{name}": balanced_accuracy(confusions[name])}
        confusion_test = confusions["test"]
        metrics |= {**{f"items_{name}": float(len(split.clips)) for name, split in splits.items()},
                    **{f"labels_{name}": float(len(coverage[name])) for name in splits},
                    "train_seconds": seconds, **cost_metrics(seconds, device, params.cost, 1)}
        tracker.log_metrics(metrics, total)
        save_classifier(checkpoint_path, model, {"label": label, **cfg.model_dump(mode="json")})
        result = ClassifierTrainResult(label, labels, str(checkpoint_path), total, seconds, metrics, confusion_test,
                                       tracker.run_id, coverage=coverage)
        atomic.write_json(out_dir / "confusion.json", {"labels": labels, "rows": "true label", "columns": "predicted",
                                                       **confusions, "coverage": coverage})
        atomic.write_json(out_dir / "result.json", asdict(result))
        write_stamp(out_dir, stamp)  # after the result: a crash between leaves no false stamp
        tracker.log_artifact(checkpoint_path, "checkpoints")
        tracker.log_artifact(out_dir / "confusion.json")
        tracker.log_artifact(out_dir / "result.json")
    return result
