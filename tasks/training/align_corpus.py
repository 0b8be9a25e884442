"""Frame alignments of the corpus transcripts: the targets of the S2S model's text stream.

A small CTC character model (models.asr.CtcRecognizer with 20 ms output frames, the codec's rate)
is trained on the train split's transcribed segments, then torchaudio's forced_align puts every
segment's transcript on its frames (models/alignment.py). It is its own run, trained here in the
training path: the evaluators' recognizer judges the replies, and nothing a judge learnt may be a
training target. Any source with transcripts in the manifest's `text` column is aligned the same way.

Written to params.align.out_dir: {split}.npz (segment_id -> (frames,) int16 character ids, 0 = no
character), aligner.pt, result.json (with the characters) and a stamp of the corpus,
settings and code (tasks/training/stage_cache.py), so an unchanged corpus is not aligned twice.
A segment without a transcript, or whose transcript does not fit its frames, gets no entry (the
S2S model then trains no text on it) and is counted in the result.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import nn
from tqdm import tqdm

from core import atomic
from core.config import Params
from core.hashing import code_hash
from models.alignment import align_frames
from models.asr import CtcRecognizer, GraphemeVocab, cer, pad_batch, save_recognizer
from tasks.data.corpus_audio import CorpusError, read_manifest
from tasks.training.device import select_device
from tasks.training.provenance import corpus_fingerprint, run_tags
from tasks.training.rng import step_generator
from tasks.training.stage_cache import cached_result, write_stamp
from tasks.training.tracker import RunTracker, tracked

SPLITS = ("train", "val", "test")
LOG_EVERY = 20


@dataclass
class AlignResult:
    checkpoint: str
    out_dir: str
    symbols: str                 # the characters, id i + 1 for symbols[i] (0: none)
    metrics: dict[str, float]    # cer_val of the aligner's own greedy transcripts, segment counts
    run_id: str | None
    cached: bool = False


@dataclass
class Segment:
    id: str
    split: str
    text: str                    # stripped; "" when the source gave none
    clip: np.ndarray             # float32, 16 kHz


def load_segments(data_dir: Path) -> list[Segment]:
    """Every kept segment of the manifest, with its transcript ("" when it has none)."""
    rows = read_manifest(data_dir)
    if "text" not in rows:
        raise CorpusError(f"the manifest at {data_dir} has no text column: a text stream needs transcripts")
    rows = rows[rows["split"].isin(SPLITS)].sort_values("segment_id")
    texts = rows["text"].fillna("").astype(str).str.strip()
    return [Segment(sid, split, text, sf.read(data_dir / path, dtype="float32")[0])
            for sid, split, text, path in zip(rows["segment_id"], rows["split"], texts, rows["path"])]


def training_stamp(params: Params) -> dict:
    """Everything the alignments depend on: corpus, settings and the code that makes them."""
    import models.alignment, models.asr, models.features  # noqa: E401

    return {"stage": "align", **corpus_fingerprint(params), "align": params.align.model_dump(mode="json"),
            "code": code_hash(models.alignment, models.asr, models.features, sys.modules[__name__])}


def train_aligner(train: list[Segment], params: Params, tracker: RunTracker, device: torch.device) -> CtcRecognizer:
    """CTC on the train split's transcribed segments, random batches drawn per step from (seed, step)."""
    cfg = params.align
    torch.manual_seed(cfg.seed)
    vocab = GraphemeVocab.from_texts([s.text for s in train])
    model = CtcRecognizer(vocab, cfg.n_mels, cfg.channels, cfg.hidden, cfg.layers, cfg.kernel_size, cfg.dropout,
                          subsample=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.max_steps)
    ctc = nn.CTCLoss(blank=GraphemeVocab.BLANK, zero_infinity=True)
    targets = [torch.tensor(vocab.encode(s.text)) for s in train]
    model.train()
    for step in tqdm(range(cfg.max_steps), desc="train aligner", unit="step"):
        picks = torch.randint(len(train), (cfg.batch_size,), generator=step_generator(cfg.seed, step)).tolist()
        audio, lengths = pad_batch([train[i].clip for i in picks])
        log_probs, out_lengths = model(audio.to(device), lengths.to(device))
        batch_targets = [targets[i] for i in picks]
        loss = ctc(log_probs.float(), torch.cat(batch_targets).to(device), out_lengths,
                   torch.tensor([len(t) for t in batch_targets], device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == cfg.max_steps:
            tracker.log_metrics({"loss": float(loss)}, step + 1)
    return model.eval()


@torch.inference_mode()
def align_segment(model: CtcRecognizer, segment: Segment) -> np.ndarray | None:
    """The segment's per-frame character ids (20 ms frames), or None when it has no usable text."""
    ids = model.vocab.encode(segment.text)
    if not ids:
        return None
    device = next(model.parameters()).device
    audio, lengths = pad_batch([segment.clip])
    log_probs, frames = model(audio.to(device), lengths.to(device))
    try:
        return align_frames(log_probs[: int(frames[0]), 0], ids).numpy().astype(np.int16)
    except ValueError:
        return None


def align_corpus(params: Params, force: bool = False, parent_run_id: str | None = None,
                 use_mlflow: bool = True) -> AlignResult:
    """Train the aligner and align every segment (or reuse the finished run with the same stamp)."""
    out_dir = params.path(params.align.out_dir)
    stamp = training_stamp(params)
    if not force and (cached := cached_result(out_dir, stamp)) is not None:
        return AlignResult(**{**cached, "cached": True})
    (out_dir / "stamp.json").unlink(missing_ok=True)  # the alignments are about to change
    segments = load_segments(params.path(params.paths.data))
    train = [s for s in segments if s.split == "train" and s.text]
    if not train:
        raise CorpusError("no train-split segment has a transcript: nothing to train the text aligner on")
    device = select_device("auto")
    tracker = RunTracker.for_training(params, "align", out_dir, True, use_mlflow, 0, None, parent_run_id)
    started = time.monotonic()
    with tracked(tracker):
        tracker.log_params({**{f"align.{k}": v for k, v in params.align.model_dump().items()},
                            "profile": params.profile, "items_train": len(train)})
        tracker.set_tags(run_tags(params, "align"))
        model = train_aligner(train, params, tracker, device)
        checkpoint = save_recognizer(out_dir / "aligner.pt", model, model.vocab, params.align.model_dump(mode="json"))
        counts = {"segments_aligned": 0, "segments_without_text": 0, "segments_unaligned": 0}
        for split in SPLITS:
            labels: dict[str, np.ndarray] = {}
            for segment in (s for s in segments if s.split == split):
                frames = align_segment(model, segment)
                if frames is not None:
                    labels[segment.id] = frames
                counts["segments_aligned" if frames is not None else
                       "segments_unaligned" if segment.text else "segments_without_text"] += 1
            with atomic.atomic_path(out_dir / f"{split}.npz", suffix=".npz") as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, **labels)
        val = [s for s in segments if s.split == "val" and s.text]
        metrics = {k: float(v) for k, v in counts.items()} | {"seconds": time.monotonic() - started}
        if val:
            metrics["cer_val"] = cer(model.transcribe([s.clip for s in val]), [s.text for s in val])
        tracker.log_metrics(metrics, params.align.max_steps)
        symbols = "".join(model.vocab.symbols)
        result = AlignResult(str(checkpoint), str(out_dir), symbols, metrics, tracker.run_id)
        atomic.write_json(out_dir / "result.json", asdict(result))
        write_stamp(out_dir, stamp)  # after the result: a crash between leaves no false stamp
    return result


def load_alignments(out_dir: Path, split: str) -> dict[str, np.ndarray]:
    """segment_id -> (frames,) character ids of one split, as align_corpus wrote them."""
    with np.load(Path(out_dir) / f"{split}.npz") as handle:
        return {k: handle[k] for k in handle.files}
