"""Train the S2S transformer on conversational pairs of codec tokens, then score it on val.

Read top to bottom: tokens for every segment (tokenized once by the trained codec), with a text
stream the reply's character per frame (tasks/training/align_corpus.py), pairs from the data flow
(a user turn, the reply, the reply's speaker and emotion), then the step loop
(a batch of pairs drawn for this step, cross-entropy on the reply tokens, warmup + cosine
learning rate, logging, atomic checkpoints) and the validation cross-entropy and perplexity,
beside two baselines: uniform (perplexity = the number of codes) and per-codebook bigrams.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from core import atomic
from core.checkpoints import restore_rng, save_checkpoint
from core.config import Params
from core.hashing import code_hash
from models.alignment import fit_frames
from models.s2s_transformer import S2SConfig, S2STransformer, build_training_example, collate_examples
from tasks.data.corpus_audio import CorpusError
from tasks.training.align_corpus import AlignResult, align_corpus, load_alignments
from tasks.training.cost import cost_metrics, planned_steps
from tasks.training.curve import record_point, reset_curve, snapshot_path
from tasks.training.device import autocast, init_distributed, select_device
from tasks.training.provenance import corpus_fingerprint, run_tags
from tasks.training.reply_renderings import control_ids, reply_renderings
from tasks.training.resume import Resume, resume_state, stamp_text
from tasks.training.rng import step_generator
from tasks.training.shards import check_same_stamp, check_shared_folder, rank_slice
from tasks.training.stage_cache import cached_result, write_stamp
from tasks.training.tokenize_corpus import load_codec, load_tokens, tokenize_corpus
from tasks.training.tracker import RunTracker, tracked


@dataclass(frozen=True)
class Pair:
    user: torch.Tensor  # (K, Tu) codes
    reply: torch.Tensor  # (K, Tr) codes
    speaker: int
    emotion: int
    text: torch.Tensor | None = None  # (Tr,) the reply's character per frame; None: no text targets


@dataclass
class S2STrainResult:
    checkpoint: str
    steps: int
    seconds: float
    metrics: dict[str, float]
    baselines: dict[str, float]
    run_id: str | None
    cached: bool = False  # True when a finished run with the same stamp was reused


def s2s_config(params: Params, codec_config: dict, text_symbols: str = "") -> S2SConfig:
    return S2SConfig(n_codebooks=codec_config["n_codebooks"], codebook_size=codec_config["codebook_size"],
                     **params.s2s.model_dump(), text_symbols=text_symbols)


def stream_weights(params: Params, config: S2SConfig) -> list[float]:
    """The loss weight of each stream, in the model's order (text, codebook 0, the residual ones)."""
    w = params.s2s_train.loss_weights
    return [w.text] * int(config.text_stream) + [w.codebook0] + [w.residual] * (config.n_codebooks - 1)


def make_pair(user_codes: np.ndarray, reply_codes: np.ndarray, speaker: int, emotion: int,
              text: np.ndarray | None, limit: int) -> Pair:
    """A pair cropped to `limit` frames per turn: the user turn keeps its end (the part the reply
    answers), the reply its start; the text is fitted to the reply's frames."""
    user = torch.from_numpy(user_codes.astype("int64"))[:, -limit:]
    reply = torch.from_numpy(reply_codes.astype("int64"))[:, :limit]
    if text is not None:
        text = fit_frames(torch.from_numpy(text.astype("int64")), reply.shape[1])
    return Pair(user, reply, speaker, emotion, text)


def load_pairs(params: Params, tokens_dir: Path, split: str, aligned: AlignResult | None = None) -> list[Pair]:
    """The split's pairs with their codes (see make_pair), and with `aligned` the reply's
    character per frame (None for a reply the aligner has no text for)."""
    data_dir = params.path(params.paths.data)
    tokens = load_tokens(tokens_dir, split)
    texts = load_alignments(Path(aligned.out_dir), split) if aligned is not None else {}
    limit = params.s2s_train.max_turn_frames
    pairs = []
    for line in (data_dir / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] != split or row["input_segment"] not in tokens or row["reply_segment"] not in tokens:
            continue
        pairs.append(make_pair(tokens[row["input_segment"]], tokens[row["reply_segment"]], row["reply_speaker_id"],
                               row["reply_emotion_id"], texts.get(row["reply_segment"]), limit))
    if not pairs:
        raise CorpusError(f"no {split} pairs in {data_dir / 'pairs.jsonl'}: the corpus needs conversations")
    return pairs


def rendered_pairs(params: Params, tokens_dir: Path, aligned: AlignResult | None) -> list[Pair]:
    """The train pairs' replies spoken again in other voices and emotions
    (tasks/training/reply_renderings.py; s2s_train.reply_renderings per pair, 0: none)."""
    if params.s2s_train.reply_renderings <= 0:
        return []
    codec = load_codec(params.path(params.codec_train.out_dir) / "last.pt")
    renderings = reply_renderings(params, tokens_dir, Path(aligned.out_dir) if aligned is not None else None, codec)
    tokens = load_tokens(tokens_dir, "train")
    return [make_pair(tokens[r.input_segment], r.codes, *control_ids(r), r.text, params.s2s_train.max_turn_frames)
            for r in renderings if r.input_segment in tokens]


def make_batch(pairs: list[Pair], indices: list[int], config: S2SConfig) -> tuple[torch.Tensor, ...]:
    chosen = [pairs[i] for i in indices]
    inputs, targets, _ = collate_examples([build_training_example(p.user, p.reply, config, p.text) for p in chosen],
                                          config)
    speaker = torch.tensor([p.speaker for p in chosen])
    emotion = torch.tensor([p.emotion for p in chosen])
    return inputs, targets, speaker, emotion


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.inference_mode()
def evaluate_s2s(model: S2STransformer, pairs: list[Pair], device: torch.device, batch: int = 16) -> dict[str, float]:
    """Cross-entropy (nats per code) and perplexity of the audio codes over every pair of a split
    (what the gate compares with uniform and bigrams), and with a text stream its own cross-entropy."""
    model.eval()
    sums = counts = 0
    for start in range(0, len(pairs), batch):
        inputs, targets, speaker, emotion = make_batch(pairs, list(range(start, min(start + batch, len(pairs)))),
                                                       model.config)
        logits = model(inputs.to(device), speaker.to(device), emotion.to(device))
        stream_sums, stream_counts = model.stream_losses(logits, targets.to(device))
        sums, counts = sums + stream_sums.cpu(), counts + stream_counts.cpu()
    model.train()
    first = int(model.config.text_stream)
    audio_tokens = int(counts[first:].sum())
    ce = float(sums[first:].sum()) / max(audio_tokens, 1)
    metrics = {"cross_entropy": ce, "perplexity": math.exp(min(ce, 50.0)), "tokens": float(audio_tokens)}
    if first:
        metrics |= {"text_cross_entropy": float(sums[0]) / max(int(counts[0]), 1), "text_tokens": float(counts[0])}
    return metrics


def bigram_cross_entropy(train: list[Pair], val: list[Pair], codebook_size: int,
                         weights: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)) -> float:
    """Cross-entropy (nats per code) of the val replies' codes under per-codebook bigram models
    fitted on the train replies: the baseline a sequence model must beat to have learnt more than
    which code follows which. Each bigram is interpolated with its add-one unigram; the weight is
    the one the val split likes best (the baseline's best case, so beating it means something)."""
    n_codebooks = train[0].reply.shape[0]
    best = []
    for k in range(n_codebooks):
        counts = torch.zeros(codebook_size, codebook_size)
        for pair in train:
            row = pair.reply[k]
            counts.index_put_((row[:-1], row[1:]), torch.ones(len(row) - 1), accumulate=True)
        unigram = (counts.sum(0) + 1) / (counts.sum() + codebook_size)
        bigram = counts / counts.sum(1, keepdim=True).clamp_min(1)
        prev = torch.cat([p.reply[k][:-1] for p in val])
        nxt = torch.cat([p.reply[k][1:] for p in val])
        scores = [float(-torch.log(w * bigram[prev, nxt] + (1 - w) * unigram[nxt]).mean()) for w in weights]
        best.append((min(scores), len(nxt)))
    return sum(ce * n for ce, n in best) / sum(n for _, n in best)


def training_stamp(params: Params, tokens_dir: Path, max_steps: int | None, world_size: int,
                   aligned: AlignResult | None = None) -> dict:
    """Everything a finished S2S run depends on: the tokens (so the codec), pairs, settings, code,
    and with a text stream the alignments."""
    import core.checkpoints, models.s2s_transformer, tasks.training.device, tasks.training.rng  # noqa: E401
    import tasks.training.shards  # noqa: E401
    import tasks.training.reply_renderings, tasks.training.tokenize_corpus  # noqa: E401

    stamp = {"stage": "s2s", **corpus_fingerprint(params), "tokens": json.loads((tokens_dir / "stamp.json").read_text()),
             "s2s": params.s2s.model_dump(mode="json"), "train": params.s2s_train.model_dump(mode="json"),
             "max_steps": max_steps, "world_size": world_size,
             "code": code_hash(models.s2s_transformer, tasks.training.tokenize_corpus, core.checkpoints,
                               tasks.training.device, tasks.training.rng, tasks.training.shards,
                               sys.modules[__name__])}
    if aligned is not None:
        stamp["align"] = json.loads((Path(aligned.out_dir) / "stamp.json").read_text())
    return stamp


def train_s2s(params: Params, resume: Resume = False, max_steps: int | None = None, track: bool = True,
              force: bool = False, parent_run_id: str | None = None) -> S2STrainResult:
    """Train (or, when a finished run has the same stamp and neither resume nor force is asked, reuse).
    resume: True continues last.pt, "auto" continues it when it has this run's stamp (resume.py)."""
    cfg = params.s2s_train
    device = select_device(cfg.device)
    dist_info = init_distributed(device)
    out_dir = params.path(cfg.out_dir)
    checkpoint_path = out_dir / "last.pt"
    check_shared_folder(out_dir, dist_info)
    tokens_dir = tokenize_corpus(params) if dist_info.is_main else params.path(params.tokens.out_dir)
    if dist_info.world_size > 1:
        torch.distributed.barrier()
    codec_config = json.loads((tokens_dir / "codec_config.json").read_text())
    aligned = None
    if params.s2s.text_stream:
        if dist_info.is_main:
            aligned = align_corpus(params, parent_run_id=parent_run_id, use_mlflow=track)
        if dist_info.world_size > 1:
            torch.distributed.barrier()
        if aligned is None:  # other ranks read the finished stage
            aligned = align_corpus(params, use_mlflow=False)
    stamp = training_stamp(params, tokens_dir, max_steps, dist_info.world_size, aligned)
    check_same_stamp(stamp, dist_info)
    if resume is not True and not force and (cached := cached_result(out_dir, stamp)) is not None:
        return S2STrainResult(**{**cached, "cached": True})
    if dist_info.is_main:
        (out_dir / "stamp.json").unlink(missing_ok=True)  # the checkpoint is about to change
    torch.manual_seed(cfg.seed)
    config = s2s_config(params, codec_config, aligned.symbols if aligned is not None else "")
    weights = stream_weights(params, config)
    model = S2STransformer(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)

    step, run_id = 0, None
    state = resume_state(checkpoint_path, stamp, False if force and resume == "auto" else resume, "s2s", dist_info)
    if state is not None:
        if state["config"] != asdict(config):
            changed = sorted(k for k in state["config"] if state["config"][k] != asdict(config).get(k))
            raise ValueError(f"checkpoint {checkpoint_path} was made with another S2S config "
                             f"(differs in: {', '.join(changed)})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, run_id = state["step"], state.get("run_id")
        restore_rng(state["rng"])
        print(f"s2s training continues {checkpoint_path} at step {step}", flush=True)
    elif dist_info.is_main:
        reset_curve(out_dir)  # curve.jsonl holds the points of one run

    if dist_info.is_main:
        extra_pairs = rendered_pairs(params, tokens_dir, aligned)  # made once, cached beside the tokens
    if dist_info.world_size > 1:
        torch.distributed.barrier()
    if not dist_info.is_main:
        extra_pairs = rendered_pairs(params, tokens_dir, aligned)
    train_pairs = load_pairs(params, tokens_dir, "train", aligned) + extra_pairs
    val_pairs = load_pairs(params, tokens_dir, "val", aligned)
    total = planned_steps(len(train_pairs), cfg.batch_size, dist_info.world_size, cfg.epochs,
                          max_steps if max_steps is not None else cfg.max_steps)

    net = DistributedDataParallel(model) if dist_info.world_size > 1 else model
    tracker = RunTracker.for_training(params, "s2s", out_dir, dist_info.is_main, track, step, run_id,
                                      parent_run_id)
    started = time.monotonic()
    with tracked(tracker):
        tracker.log_params({**{f"s2s.{k}": v for k, v in asdict(config).items()},
                            **{f"train.{k}": v for k, v in cfg.model_dump().items()},
                            "profile": params.profile, "world_size": dist_info.world_size, "device": device.type,
                            "parameters": model.num_parameters(), "train_pairs": len(train_pairs),
                            "total_steps": total})
        tracker.set_tags(run_tags(params, "s2s"))
        bar = tqdm(total=total, initial=step, desc="train s2s", unit="step", disable=not dist_info.is_main)
        window_start, window_tokens, window_steps, scoring_seconds = time.monotonic(), 0, 0, 0.0
        model.train()
        while step < total:
            generator = step_generator(cfg.seed, step)  # the global batch, the same on every rank
            indices = torch.randint(len(train_pairs), (cfg.batch_size * dist_info.world_size,), generator=generator)
            dropped = (torch.rand(len(indices), generator=generator) < cfg.condition_dropout
                       if config.guidable and cfg.condition_dropout > 0 else None)
            indices = rank_slice(indices, dist_info).tolist()
            inputs, targets, speaker, emotion = make_batch(train_pairs, indices, config)
            if dropped is not None:  # the null condition guidance contrasts with
                dropped = rank_slice(dropped, dist_info)
                speaker = speaker.masked_fill(dropped, config.null_speaker)
                emotion = emotion.masked_fill(dropped, config.null_emotion)
            inputs, targets, speaker, emotion = (t.to(device) for t in (inputs, targets, speaker, emotion))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, cfg.lr, cfg.warmup_steps)
            with autocast(device):
                logits = net(inputs, speaker, emotion)
            loss = model.loss(logits, targets, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            window_tokens += int((targets[:, int(config.text_stream):] != config.pad_id).sum())  # audio codes
            bar.update(1)
            window_steps += 1
            if step % cfg.log_every == 0 or step == total:
                elapsed = time.monotonic() - window_start
                rate = window_tokens * dist_info.world_size / max(elapsed, 1e-9)
                tracker.log_metrics({"loss": float(loss), "perplexity": math.exp(min(float(loss), 50.0)),
                                     "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": rate,
                                     "step_seconds": elapsed / max(window_steps, 1)}, step)
                bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{rate:.0f}")
                window_start, window_tokens, window_steps = time.monotonic(), 0, 0
            if dist_info.is_main and (step % cfg.checkpoint_every == 0 or step == total):
                save_checkpoint(checkpoint_path, model=model.state_dict(), config=asdict(config),
                                codec_config=codec_config, optimizer=optimizer.state_dict(), step=step,
                                run_id=tracker.run_id, stamp=stamp_text(stamp))
            if dist_info.is_main and step in cfg.curve_steps:
                scoring_started = time.monotonic()
                point = record_point(out_dir, step, scoring_started - started - scoring_seconds,
                                     evaluate_s2s(model, val_pairs, device))
                tracker.log_metrics({f"curve_{k}": v for k, v in point.items() if k != "step"}, step)
                save_checkpoint(snapshot_path(out_dir, step), with_rng=False, model=model.state_dict(),
                                config=asdict(config), codec_config=codec_config, step=step)
                model.train()
                scoring_seconds += time.monotonic() - scoring_started
                window_start = time.monotonic()
        bar.close()
        seconds = time.monotonic() - started - scoring_seconds
        if not dist_info.is_main:
            return S2STrainResult(str(checkpoint_path), step, seconds, {}, {}, None)
        metrics = evaluate_s2s(model, val_pairs, device)
        metrics["bigram_cross_entropy"] = bigram_cross_entropy(train_pairs, val_pairs, config.codebook_size)
        baselines = {"perplexity": float(config.codebook_size), "cross_entropy": math.log(config.codebook_size)}
        tracker.log_metrics({"val_cross_entropy": metrics["cross_entropy"], "val_perplexity": metrics["perplexity"],
                             **({"val_text_cross_entropy": metrics["text_cross_entropy"]}
                                if "text_cross_entropy" in metrics else {}),
                             "val_bigram_cross_entropy": metrics["bigram_cross_entropy"],
                             "uniform_perplexity": baselines["perplexity"],
                             **cost_metrics(seconds, device, params.cost, dist_info.world_size)}, step)
        result = S2STrainResult(str(checkpoint_path), step, seconds, metrics, baselines, tracker.run_id)
        atomic.write_json(out_dir / "result.json", asdict(result))
        write_stamp(out_dir, stamp)  # after the result: a crash between leaves no false stamp
        tracker.log_artifact(checkpoint_path, "checkpoints")
        tracker.log_artifact(out_dir / "result.json")
    return result
