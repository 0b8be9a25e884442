"""Train the CTC recognizer (models/asr.py) on the corpus's transcripts, then score its CER.

It is an evaluator, not a product: trained once per corpus version (the stamp holds the corpus
fingerprint, the settings and the code), then reused by the quality evaluation to turn generated
speech back into Telugu script. Read top to bottom: the batch plan (whole utterances, grouped by
length, a fresh plan per epoch drawn from (seed, epoch) alone), SpecAugment, the step loop, and
the scoring on val and test, with the test items whose sentence never occurs in train scored
apart (the corpus repeats sentences across voices and emotions; those items measure recognition,
the others partly memory).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor, nn
from tqdm import tqdm

from core import atomic
from core.config import Params
from core.hashing import code_hash
from models.asr import CtcRecognizer, GraphemeVocab, cer, pad_batch, save_recognizer
from tasks.data.corpus_audio import CorpusError, read_manifest
from tasks.training.cost import cost_metrics
from tasks.training.device import select_device
from tasks.training.provenance import corpus_fingerprint, run_tags
from tasks.training.rng import step_generator
from tasks.training.stage_cache import cached_result, write_stamp
from tasks.training.tracker import RunTracker, tracked

LOG_EVERY = 20
WARMUP_FRACTION = 0.15   # of the one-cycle schedule spent rising to the peak lr
LENGTH_JITTER = 0.1      # batches group utterances of similar length, +-10 % shuffled each epoch
FREQ_MASKS, FREQ_MASK_BINS = 2, 15
TIME_MASK_EVERY, TIME_MASK_FRAMES = 150, 20  # one time mask per 1.5 s of the longest clip, up to 0.2 s


@dataclass
class AsrTrainResult:
    checkpoint: str
    steps: int
    seconds: float
    metrics: dict[str, float]   # cer_val, cer_test, cer_test_unseen (when any), cer_train, item counts
    run_id: str | None
    cached: bool = False        # True when a finished run with the same stamp was reused


@dataclass
class Split:
    ids: list[str]
    texts: list[str]
    clips: list[np.ndarray]     # float32, 16 kHz


def load_split(data_dir: Path, split: str) -> Split:
    """The segments of one split that have a transcript (sorted by id), audio as float32."""
    rows = read_manifest(data_dir)
    if "text" not in rows:
        raise CorpusError(f"the manifest at {data_dir} has no text column: the recognizer needs transcripts")
    rows = rows[(rows["split"] == split) & (rows["text"].str.strip() != "")].sort_values("segment_id")
    clips = [sf.read(data_dir / path, dtype="float32")[0] for path in rows["path"]]
    return Split(list(rows["segment_id"]), [t.strip() for t in rows["text"]], clips)


def batch_plan(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches: every item once, similar lengths together (little padding), the
    grouping jittered and the batch order shuffled by `generator`."""
    jitter = 1 + LENGTH_JITTER * (2 * torch.rand(len(lengths), generator=generator) - 1)
    order = torch.argsort(torch.tensor(lengths, dtype=torch.float) * jitter).tolist()
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def spec_augment(feats: Tensor, frames: Tensor, generator: torch.Generator) -> Tensor:
    """SpecAugment without warping: zero FREQ_MASKS mel bands and a few time spans per item."""
    batch, bins, length = feats.shape
    keep = torch.ones(batch, bins, length, dtype=torch.bool)

    def spans(count: int, limit: Tensor, width: int) -> tuple[Tensor, Tensor]:
        widths = torch.randint(0, width + 1, (batch, count), generator=generator)
        starts = (torch.rand(batch, count, generator=generator) * (limit[:, None] - widths).clamp(min=1)).long()
        return starts, starts + widths

    positions = torch.arange(bins)
    lo, hi = spans(FREQ_MASKS, torch.full((batch,), bins), FREQ_MASK_BINS)
    for k in range(FREQ_MASKS):
        keep &= ~((positions[None] >= lo[:, k, None]) & (positions[None] < hi[:, k, None]))[:, :, None]
    positions = torch.arange(length)
    count = max(1, length // TIME_MASK_EVERY)
    lo, hi = spans(count, frames.cpu(), TIME_MASK_FRAMES)
    for k in range(count):
        keep &= ~((positions[None] >= lo[:, k, None]) & (positions[None] < hi[:, k, None]))[:, None, :]
    return feats * keep.to(feats.device)


def score(model: CtcRecognizer, split: Split, name: str,
          seen: set[str] | None = None) -> tuple[dict[str, float], list[dict]]:
    """cer_<name> of greedy transcripts over a split, and cer_<name>_unseen over the items whose
    sentence is not in `seen` (when given and there are any); nothing when no item has a text."""
    if not split.texts:
        return {}, []
    hyps = model.transcribe(split.clips)
    rows = [{"split": name, "segment_id": i, "ref": r, "hyp": h} for i, r, h in zip(split.ids, split.texts, hyps)]
    figures = {f"cer_{name}": cer(hyps, split.texts), f"items_{name}": float(len(hyps))}
    if seen is not None:
        unseen = [k for k, text in enumerate(split.texts) if text not in seen]
        figures[f"items_{name}_unseen"] = float(len(unseen))
        if unseen:
            figures[f"cer_{name}_unseen"] = cer([hyps[k] for k in unseen], [split.texts[k] for k in unseen])
    return figures, rows


def training_stamp(params: Params) -> dict:
    """Everything a finished recognizer depends on: corpus, settings and the code that trains it."""
    import models.asr, models.features  # noqa: E401

    return {"stage": "asr", **corpus_fingerprint(params), "asr": params.evaluation.asr.model_dump(mode="json"),
            "code": code_hash(models.asr, models.features, sys.modules[__name__])}


def train_asr(params: Params, force: bool = False, parent_run_id: str | None = None,
              use_mlflow: bool = True) -> AsrTrainResult:
    """Train the recognizer on the train split's transcribed segments (or reuse the finished run
    with the same stamp unless `force`), and score it on val and test."""
    cfg = params.evaluation.asr
    out_dir = params.path(params.evaluation.out_dir) / "asr"
    checkpoint_path = out_dir / "recognizer.pt"
    stamp = training_stamp(params)
    if not force and (cached := cached_result(out_dir, stamp)) is not None:
        return AsrTrainResult(**{**cached, "cached": True})
    (out_dir / "stamp.json").unlink(missing_ok=True)  # the checkpoint is about to change

    data_dir = params.path(params.paths.data)
    train = load_split(data_dir, "train")
    if not train.texts:
        raise CorpusError(f"no train-split segment of {data_dir} has a transcript: nothing to train a recognizer on")
    device = select_device("auto")
    torch.manual_seed(cfg.seed)
    vocab = GraphemeVocab.from_texts(train.texts)
    model = CtcRecognizer(vocab, cfg.n_mels, cfg.channels, cfg.hidden, cfg.layers, cfg.kernel_size,
                          cfg.dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.max_steps,
                                                   pct_start=WARMUP_FRACTION)
    ctc = nn.CTCLoss(blank=GraphemeVocab.BLANK, zero_infinity=True)
    targets = [torch.tensor(vocab.encode(t)) for t in train.texts]
    lengths = [len(c) for c in train.clips]
    per_epoch = math.ceil(len(lengths) / cfg.batch_size)

    tracker = RunTracker.for_training(params, "asr", out_dir, True, use_mlflow, 0, None, parent_run_id)
    started = time.monotonic()
    with tracked(tracker):
        tracker.log_params({**{f"asr.{k}": v for k, v in cfg.model_dump().items()}, "profile": params.profile,
                            "device": device.type, "vocab_size": len(vocab), "items_train": len(train.texts),
                            "parameters": sum(p.numel() for p in model.parameters())})
        tracker.set_tags(run_tags(params, "asr"))
        bar = tqdm(total=cfg.max_steps, desc="train recognizer", unit="step")
        model.train()
        plan: list[list[int]] = []
        for step in range(cfg.max_steps):
            if step % per_epoch == 0:  # drawn from (seed + 1, epoch) alone, apart from the steps' masks
                plan = batch_plan(lengths, cfg.batch_size, step_generator(cfg.seed + 1, step // per_epoch))
            picks = plan[step % per_epoch]
            audio, clip_lengths = pad_batch([train.clips[i] for i in picks])
            feats, frames = model.features(audio.to(device), clip_lengths.to(device))
            if cfg.spec_augment:
                feats = spec_augment(feats, frames, step_generator(cfg.seed, step))
            log_probs, out_lengths = model.encode(feats, frames)
            batch_targets = [targets[i] for i in picks]
            loss = ctc(log_probs.float(), torch.cat(batch_targets).to(device), out_lengths,
                       torch.tensor([len(t) for t in batch_targets], device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.update(1)
            if (step + 1) % LOG_EVERY == 0 or step + 1 == cfg.max_steps:
                value = loss.item()
                tracker.log_metrics({"loss": value, "lr": schedule.get_last_lr()[0]}, step + 1)
                bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        seconds = time.monotonic() - started
        save_recognizer(checkpoint_path, model, vocab, cfg.model_dump(mode="json"))

        model.eval()
        metrics: dict[str, float] = {"vocab_size": float(len(vocab))}
        head = Split(train.ids[:64], train.texts[:64], train.clips[:64])  # enough to see over-fitting
        metrics |= {"cer_train": score(model, head, "train")[0]["cer_train"], "items_train": float(len(train.texts))}
        transcripts = []
        for name in ("val", "test"):
            figures, rows = score(model, load_split(data_dir, name), name, seen=set(train.texts))
            metrics |= figures
            transcripts += rows
        tracker.log_metrics({**metrics, **cost_metrics(seconds, device, params.cost, 1)}, cfg.max_steps)
        atomic.write_jsonl(out_dir / "transcripts.jsonl", transcripts)
        result = AsrTrainResult(str(checkpoint_path), cfg.max_steps, seconds, metrics, tracker.run_id)
        atomic.write_json(out_dir / "result.json", asdict(result))
        write_stamp(out_dir, stamp)  # after the result: a crash between leaves no false stamp
        tracker.log_artifact(checkpoint_path, "checkpoints")
        tracker.log_artifact(out_dir / "transcripts.jsonl")
        tracker.log_artifact(out_dir / "result.json")
    return result
