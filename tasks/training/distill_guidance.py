"""Classifier-free guidance distilled into the S2S model: the voice controls' 2x-compute gain at 1x.

Guidance at inference (models/s2s_transformer.py, serving/engine.py) runs every reply twice, with
and without its speaker and emotion, and samples from unconditioned + g x (conditioned -
unconditioned): the controls are followed more closely, at twice the S2S compute of a server that
is already compute-bound. Here a trained model (the teacher, frozen) is fine-tuned (the student,
initialised from it) so that its conditioned distribution alone matches the teacher's guided one
on the training pairs: per position and stream, the cross-entropy of the student's logits against
softmax(free + g x (conditioned - free)) of the teacher, under the S2S loss's stream weights and
PAD mask. Rows that training drops to the null condition (s2s_train.condition_dropout) are matched
to the teacher's own unconditioned distribution, so the student's null condition stays what it
was. The targets are teacher-forced on the corpus's (and the renderings') replies; what that costs
against guidance sampled step by step is measured, not assumed (docs/history.md).

A stage of its own after S2S training (s2s_distill; steps 0 = off), keyed by the S2S run's stamp
and its own settings, so a finished S2S run is reused and a re-run skips both; a flow killed
mid-distillation continues from its last checkpoint (resume="auto"). The checkpoint it writes has
the S2S checkpoint's format, so everything downstream (gate, bundle, serving) takes it as is.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core import atomic
from core.checkpoints import load_checkpoint, restore_rng, save_checkpoint
from core.config import Params
from core.hashing import code_hash
from models.s2s_transformer import S2SConfig, S2STransformer
from tasks.training.align_corpus import align_corpus
from tasks.training.cost import cost_metrics
from tasks.training.device import autocast, select_device
from tasks.training.provenance import run_tags
from tasks.training.resume import Resume, resume_state, stamp_text
from tasks.training.rng import step_generator
from tasks.training.stage_cache import cached_result, write_stamp
from tasks.training.tracker import RunTracker, tracked
from tasks.training.train_s2s import (S2STrainResult, bigram_cross_entropy, evaluate_s2s, learning_rate, load_pairs,
                                      make_batch, rendered_pairs, stream_weights)

LOG_EVERY = 20


def guided_logits(teacher: S2STransformer, inputs: torch.Tensor, speaker: torch.Tensor, emotion: torch.Tensor,
                  guidance: float, dropped: torch.Tensor | None) -> torch.Tensor:
    """The teacher's target logits (B, S, L, W): free + guidance x (conditioned - free) for the
    conditioned rows, its unconditioned logits for rows dropped to the null condition (`dropped`)."""
    config = teacher.config
    batch = inputs.shape[0]
    with torch.no_grad():
        both = teacher(torch.cat([inputs, inputs]),
                       torch.cat([speaker, torch.full_like(speaker, config.null_speaker)]),
                       torch.cat([emotion, torch.full_like(emotion, config.null_emotion)])).float()
    conditioned, free = both[:batch], both[batch:]
    guided = free + guidance * (conditioned - free)
    if dropped is not None:
        guided = torch.where(dropped[:, None, None, None], free, guided)
    return guided


def distillation_loss(logits: torch.Tensor, target_logits: torch.Tensor, targets: torch.Tensor, config: S2SConfig,
                      weights: list[float]) -> torch.Tensor:
    """Cross-entropy of `logits` against softmax(`target_logits`) at every non-PAD target position
    (B, S, L), each stream's positions weighted as in the S2S loss."""
    pads = torch.tensor(config.stream_pads, device=targets.device)[None, :, None]
    counted = (targets != pads).float()  # (B, S, L)
    soft = -(F.softmax(target_logits, dim=-1) * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    w = torch.tensor(weights, dtype=soft.dtype, device=soft.device)[None, :, None]
    return (w * soft * counted).sum() / (w * counted).sum().clamp_min(1)


def distill_stamp(params: Params, s2s_dir: Path) -> dict:
    """Everything a finished distillation depends on: the S2S run (its own stamp), the settings, code."""
    import models.s2s_transformer, tasks.training.train_s2s  # noqa: E401

    return {"stage": "s2s-distill", "s2s": json.loads((s2s_dir / "stamp.json").read_text()),
            "distill": params.s2s_distill.model_dump(mode="json"),
            "condition_dropout": params.s2s_train.condition_dropout,
            "code": code_hash(models.s2s_transformer, tasks.training.train_s2s, sys.modules[__name__])}


def distill_guidance(params: Params, s2s: S2STrainResult, resume: Resume = False, track: bool = True,
                     force: bool = False, parent_run_id: str | None = None) -> S2STrainResult:
    """Fine-tune the finished S2S run `s2s` towards its own guided distribution (module docstring);
    return the distilled model as an S2S result. With s2s_distill.steps 0, `s2s` itself."""
    cfg = params.s2s_distill
    if cfg.steps <= 0:
        return s2s
    if cfg.guidance <= 1.0:
        raise ValueError(f"s2s_distill.guidance must be above 1 (1 is the model itself), got {cfg.guidance}")
    teacher_state = load_checkpoint(Path(s2s.checkpoint))
    config = S2SConfig(**teacher_state["config"])
    if not config.guidable:
        raise ValueError(f"guidance distillation needs a model trained with conditioning 'every_step' "
                         f"(this one: {config.conditioning!r}); set s2s_distill.steps to 0")
    s2s_dir = Path(s2s.checkpoint).parent
    out_dir = params.path(cfg.out_dir)
    checkpoint_path = out_dir / "last.pt"
    stamp = distill_stamp(params, s2s_dir)
    if resume is not True and not force and (cached := cached_result(out_dir, stamp)) is not None:
        return S2STrainResult(**{**cached, "cached": True})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stamp.json").unlink(missing_ok=True)  # the checkpoint is about to change

    device = select_device(params.s2s_train.device)
    torch.manual_seed(cfg.seed)
    teacher = S2STransformer(config).to(device)
    teacher.load_state_dict(teacher_state["model"])
    teacher.eval()
    model = copy.deepcopy(teacher)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    step, run_id = 0, None
    state = resume_state(checkpoint_path, stamp, False if force and resume == "auto" else resume, "s2s-distill",
                         _single_process())
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, run_id = state["step"], state.get("run_id")
        restore_rng(state["rng"])
        print(f"s2s-distill continues {checkpoint_path} at step {step}", flush=True)

    tokens_dir = params.path(params.tokens.out_dir)
    aligned = align_corpus(params, use_mlflow=False) if config.text_stream else None
    train_pairs = load_pairs(params, tokens_dir, "train", aligned) + rendered_pairs(params, tokens_dir, aligned)
    val_pairs = load_pairs(params, tokens_dir, "val", aligned)
    weights = stream_weights(params, config)
    batch_size, dropout = params.s2s_train.batch_size, params.s2s_train.condition_dropout

    tracker = RunTracker.for_training(params, "s2s-distill", out_dir, True, track, step, run_id, parent_run_id)
    started = time.monotonic()
    with tracked(tracker):
        tracker.log_params({**{f"distill.{k}": v for k, v in cfg.model_dump().items()},
                            "teacher_checkpoint": s2s.checkpoint, "teacher_run_id": str(s2s.run_id),
                            "profile": params.profile, "train_pairs": len(train_pairs), "batch_size": batch_size})
        tracker.set_tags(run_tags(params, "s2s-distill"))
        bar = tqdm(total=cfg.steps, initial=step, desc=f"distill guidance {cfg.guidance:g}", unit="step")
        window_start, window_steps = time.monotonic(), 0
        while step < cfg.steps:
            generator = step_generator(cfg.seed, step)
            indices = torch.randint(len(train_pairs), (batch_size,), generator=generator).tolist()
            dropped = torch.rand(batch_size, generator=generator) < dropout if dropout > 0 else None
            inputs, targets, speaker, emotion = make_batch(train_pairs, indices, config)
            if dropped is not None:
                speaker = speaker.masked_fill(dropped, config.null_speaker)
                emotion = emotion.masked_fill(dropped, config.null_emotion)
                dropped = dropped.to(device)
            inputs, targets, speaker, emotion = (t.to(device) for t in (inputs, targets, speaker, emotion))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg.steps, cfg.lr, max(1, cfg.steps // 20))
            with autocast(device):
                target_logits = guided_logits(teacher, inputs, speaker, emotion, cfg.guidance, dropped)
                logits = model(inputs, speaker, emotion)
            loss = distillation_loss(logits, target_logits, targets, config, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            window_steps += 1
            bar.update(1)
            if step % LOG_EVERY == 0 or step == cfg.steps:
                elapsed = time.monotonic() - window_start
                tracker.log_metrics({"distill_loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
                                     "step_seconds": elapsed / max(window_steps, 1)}, step)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                window_start, window_steps = time.monotonic(), 0
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(checkpoint_path, model=model.state_dict(), config=asdict(config),
                                codec_config=teacher_state["codec_config"], optimizer=optimizer.state_dict(),
                                step=step, run_id=tracker.run_id, stamp=stamp_text(stamp))
        bar.close()
        seconds = time.monotonic() - started
        metrics = evaluate_s2s(model, val_pairs, device)
        metrics["bigram_cross_entropy"] = bigram_cross_entropy(train_pairs, val_pairs, config.codebook_size)
        metrics["teacher_cross_entropy"] = s2s.metrics.get("cross_entropy", math.nan)
        tracker.log_metrics({"val_cross_entropy": metrics["cross_entropy"], "val_perplexity": metrics["perplexity"],
                             "teacher_val_cross_entropy": metrics["teacher_cross_entropy"],
                             **cost_metrics(seconds, device, params.cost, 1)}, step)
        result = S2STrainResult(str(checkpoint_path), step, s2s.seconds + seconds, metrics, s2s.baselines,
                                tracker.run_id)
        atomic.write_json(out_dir / "result.json", asdict(result))
        write_stamp(out_dir, stamp)  # after the result: a crash between leaves no false stamp
        tracker.log_artifact(checkpoint_path, "checkpoints")
        tracker.log_artifact(out_dir / "result.json")
    return result


def _single_process():  # noqa: ANN202 - the DistInfo of a run without torchrun
    from tasks.training.device import DistInfo

    return DistInfo(rank=0, world_size=1, local_rank=0)
