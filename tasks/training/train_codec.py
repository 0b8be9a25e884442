"""Train TeluCodec (v2 "mel" or v1 "conv") on the corpus's train split, then score it.

Read top to bottom: set-up (device, DDP, model, optimizers, resume), for v2 the k-means fit of
its quantizer, the step loop (a batch of random crops drawn for this step; v2: spectral losses
on the vocoder at the codec's delay; v1: spectral + waveform + commitment losses; either with an
optional discriminator; logging, atomic checkpoints), then the evaluation on the test split and
the unseen-voices set against reference codecs on the same audio (silence, mu-law at the same
bitrate, Opus 6 kbps, Codec2 1.6 and 3.2 kbps), logged to MLflow with the checkpoint.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchaudio.functional as AF
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from core import atomic
from core.checkpoints import restore_rng, save_checkpoint
from core.config import Params
from core.hashing import code_hash
from models.codec import STFTDiscriminator, reconstruction_loss, snr_loss
from models.codecs import Codec, codec_from_config
from models.mel_codec import MelCodec
from models.metrics import mel_distance, pesq_wb, si_sdr_db, snr_db, stoi
from tasks.data.corpus_audio import load_clips, random_crops
from tasks.evaluation.codec_baselines import REFERENCE_CODECS, align, nominal_lag, round_trip
from tasks.evaluation.unseen_voices import unseen_set
from tasks.training.codec_voices import extra_voice_clips
from tasks.training.cost import cost_metrics, planned_steps
from tasks.training.curve import record_point, reset_curve, snapshot_path
from tasks.training.device import autocast, init_distributed, select_device
from tasks.training.provenance import corpus_fingerprint, run_tags
from tasks.training.resume import Resume, resume_state, stamp_text
from tasks.training.rng import step_generator
from tasks.training.shards import check_same_stamp, check_shared_folder, rank_slice
from tasks.training.stage_cache import cached_result, write_stamp
from tasks.training.tracker import RunTracker, tracked

COMMITMENT_WEIGHT = 1.0
# Spectral losses alone leave the phase free: measured here, a smoke codec trained without a
# waveform term reached mel distance 0.61 and STOI 0.47 but a waveform SNR of -1.1 dB; with L1 on
# samples, -0.44 dB (models/codec.py: snr_loss says why the SNR term replaced it).
ADVERSARIAL_WEIGHTS = {"adversarial": 1.0, "feature_matching": 2.0}


@dataclass
class CodecTrainResult:
    checkpoint: str
    steps: int
    seconds: float
    bitrate_bps: float
    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    run_id: str | None
    cached: bool = False  # True when a finished run with the same stamp was reused


def score_signals(pairs: list[tuple[np.ndarray, np.ndarray]], sample_rate: int) -> dict[str, float]:
    """Mean codec metrics over (reference, estimate) pairs; PESQ over the items it can score."""
    rows = {"snr_db": [], "si_sdr_db": [], "mel_distance": [], "stoi": [], "pesq_wb": []}
    for ref, est in pairs:
        rows["snr_db"].append(snr_db(ref, est))
        rows["si_sdr_db"].append(si_sdr_db(ref, est))
        rows["mel_distance"].append(mel_distance(ref, est, sample_rate))
        rows["stoi"].append(stoi(ref, est, sample_rate))
        p = pesq_wb(ref, est, sample_rate) if sample_rate == 16000 else None
        if p is not None:
            rows["pesq_wb"].append(p)
    return {k: float(np.mean(v)) for k, v in rows.items() if v}


def mulaw_baseline(audio: np.ndarray, sample_rate: int, bitrate: float) -> np.ndarray:
    """8-bit mu-law PCM at the sample rate the codec's bitrate buys, upsampled back."""
    low_rate = max(1, int(bitrate // 8))
    x = torch.from_numpy(audio).float()
    low = AF.resample(x, sample_rate, low_rate)
    coded = AF.mu_law_decoding(AF.mu_law_encoding(low.clamp(-1, 1), 256), 256)
    return AF.resample(coded, low_rate, sample_rate)[: len(audio)].numpy()


@torch.inference_mode()
def round_trip_codec(model: Codec, ref: np.ndarray, device: torch.device) -> np.ndarray:
    """One clip through encode and decode, cut back into line with the input (nominal delay)."""
    wav = torch.from_numpy(ref)[None, None].to(device)
    out = model.decode(model.encode(wav))[0, 0].float().cpu().numpy()
    return out[model.delay_samples: model.delay_samples + len(ref)]


def score_clips(model: Codec, clips: list[np.ndarray], device: torch.device,
                baselines: bool) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The codec's metrics on float clips and, when asked, those of the reference codecs on the
    same clips (silence, mu-law at the same bitrate, Opus, Codec2), each at its nominal delay."""
    sr = model.config.sample_rate
    model.eval()
    coded = [(ref, round_trip_codec(model, ref, device)) for ref in clips]
    scores = {**score_signals([align(r, e, 0) for r, e in coded], sr),
              "delay_ms": 1000.0 * model.delay_samples / sr}
    if not baselines:
        return scores, {}
    others = {"silence": score_signals([(r, np.zeros_like(r)) for r in clips], sr),
              "mulaw_same_bitrate": score_signals([(r, mulaw_baseline(r, sr, model.bitrate())) for r in clips], sr)}
    for name, reference in REFERENCE_CODECS.items():
        pairs = [(r, round_trip(r, sr, reference)) for r in clips]
        lag = nominal_lag(pairs, max_lag=sr // 10)
        others[name] = {**score_signals([align(r, e, lag) for r, e in pairs], sr), "delay_ms": 1000.0 * lag / sr}
    return scores, others


def evaluate_codec(model: Codec, params: Params, device: torch.device,
                   with_baselines: bool = True) -> tuple[dict, dict]:
    """Test-split metrics (and the reference codecs') plus the same on the unseen-voices set,
    whose figures carry an `unseen_` prefix (codec and baselines alike)."""
    clips, _ = load_clips(params.path(params.paths.data), "test", limit=params.codec_train.eval_items)
    metrics, baselines = score_clips(model, [c.astype(np.float32) / 32768.0 for c in clips], device, with_baselines)
    if params.codec_train.unseen_items > 0:
        unseen = [audio for _, audio in unseen_set(params.codec_train.unseen_items, model.config.sample_rate)]
        u_metrics, u_baselines = score_clips(model, unseen, device, with_baselines)
        metrics |= {f"unseen_{k}": v for k, v in u_metrics.items()}
        for name, figures in u_baselines.items():
            baselines[name] |= {f"unseen_{k}": v for k, v in figures.items()}
    return metrics, baselines


def training_stamp(params: Params, max_steps: int | None, world_size: int) -> dict:
    """Everything a finished codec run depends on: corpus, settings and the code that trains it."""
    import core.checkpoints, models.codec, models.mel_codec, models.quantizer, models.streaming  # noqa: E401
    import tasks.data.corpus_audio, tasks.evaluation.codec_baselines, tasks.evaluation.unseen_voices  # noqa: E401
    import tasks.training.codec_voices, tasks.training.device, tasks.training.rng, tasks.training.shards  # noqa: E401

    return {"stage": "codec", **corpus_fingerprint(params), "codec": params.codec.architecture(),
            "train": params.codec_train.model_dump(mode="json"), "max_steps": max_steps, "world_size": world_size,
            "code": code_hash(models.codec, models.mel_codec, models.quantizer, models.streaming,
                              tasks.data.corpus_audio, tasks.evaluation.codec_baselines,
                              tasks.evaluation.unseen_voices, tasks.training.codec_voices,
                              core.checkpoints, tasks.training.device,
                              tasks.training.rng, tasks.training.shards,
                              sys.modules[__name__])}


@torch.no_grad()
def fit_mel_codec(model: MelCodec, clips: list[np.ndarray], seed: int, iterations: int,
                  gain_db: float) -> list[float]:
    """Fit v2's fixed parts on the train split: the per-bin mel statistics, then the k-means
    codebooks. Each clip is taken at a random gain of +-gain_db, so levels outside the corpus's
    (a quieter microphone, an unseen voice) still land near codes. Returns the quantizer's error
    (mean squared residual) after each codebook."""
    generator = torch.Generator().manual_seed(seed)
    frames = []
    for clip in clips:
        gain = 10 ** (float(torch.empty(1).uniform_(-gain_db, gain_db, generator=generator)) / 20)
        wav = torch.from_numpy(clip.astype(np.float32) / 32768.0)[None, None] * gain
        frames.append(model.front_end(model._pad(wav.clamp(-1, 1).to(model.mel_mean.device)))[0].t().cpu())
    raw = torch.cat(frames)
    model.fit_normalization(raw.to(model.mel_mean.device))
    return model.fit_quantizer(model.normalize(raw.t().to(model.mel_mean.device)).t().cpu(), iterations, seed)


def conv_losses(net: torch.nn.Module, batch: torch.Tensor, cfg, sample_rate: int, device: torch.device):
    """v1: the whole codec learns; spectral + waveform (-SNR) + commitment losses."""
    with autocast(device):
        out = net(batch)
    parts = reconstruction_loss(out.audio, batch, sample_rate)
    waveform = snr_loss(out.audio, batch)
    loss = parts["total"] + cfg.waveform_weight * waveform + COMMITMENT_WEIGHT * out.commitment_loss
    return loss, out.audio, batch, {"loss": float(loss), "stft": float(parts["stft"]), "mel": float(parts["mel"]),
                                    "waveform_snr_db": -float(waveform), "commitment": float(out.commitment_loss)}


def augment_gains(rows: int, cfg, generator: torch.Generator) -> torch.Tensor:
    """v2: a random gain of +-gain_augment_db per crop, (rows, 1, 1)."""
    return 10 ** (torch.empty(rows, 1, 1).uniform_(-cfg.gain_augment_db, cfg.gain_augment_db, generator=generator) / 20)


def mel_losses(net: torch.nn.Module, model: MelCodec, batch: torch.Tensor, gains: torch.Tensor,
               device: torch.device):
    """v2: only the vocoder learns, from the quantized mel of a gain-augmented crop to the crop
    itself at the codec's delay; spectral losses only (a vocoder chooses its own phase)."""
    batch = (batch * gains.to(batch.device)).clamp(-1, 1)
    with torch.no_grad():
        mel = model.dequantize(model.encode(batch))
    with autocast(device):
        audio = net(mel)
    delay = model.delay_samples
    pred, target = audio[..., delay:], batch[..., : batch.shape[-1] - delay]
    parts = reconstruction_loss(pred, target, model.config.sample_rate)
    return parts["total"], pred, target, {"loss": float(parts["total"]), "stft": float(parts["stft"]),
                                          "mel": float(parts["mel"])}


def train_codec(params: Params, resume: Resume = False, max_steps: int | None = None, track: bool = True,
                force: bool = False, parent_run_id: str | None = None) -> CodecTrainResult:
    """Train (or, when a finished run has the same stamp and neither resume nor force is asked, reuse).
    resume: True continues last.pt, "auto" continues it when it has this run's stamp (resume.py)."""
    cfg = params.codec_train
    device = select_device(cfg.device)
    dist_info = init_distributed(device)
    out_dir = params.path(cfg.out_dir)
    checkpoint_path = out_dir / "last.pt"
    check_shared_folder(out_dir, dist_info)
    stamp = training_stamp(params, max_steps, dist_info.world_size)
    check_same_stamp(stamp, dist_info)
    if resume is not True and not force and (cached := cached_result(out_dir, stamp)) is not None:
        return CodecTrainResult(**{**cached, "cached": True})
    (out_dir / "stamp.json").unlink(missing_ok=True)  # the checkpoint is about to change
    torch.manual_seed(cfg.seed)

    model = codec_from_config(params.codec.architecture()).to(device)
    trained = model.vocoder if isinstance(model, MelCodec) else model  # v2 fits the rest by k-means
    optimizer = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, betas=(0.8, 0.99))
    discriminator = STFTDiscriminator().to(device) if cfg.adversarial else None
    disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=cfg.lr, betas=(0.8, 0.99)) if discriminator else None

    step, run_id = 0, None
    state = resume_state(checkpoint_path, stamp, False if force and resume == "auto" else resume, "codec", dist_info)
    if state is not None:
        model.load_checkpoint_state(state["model"], state["config"])
        optimizer.load_state_dict(state["optimizer"])
        if discriminator is not None and state.get("discriminator"):
            discriminator.load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        step, run_id = state["step"], state.get("run_id")
        restore_rng(state["rng"])
        print(f"codec training continues {checkpoint_path} at step {step}", flush=True)
    elif dist_info.is_main:
        reset_curve(out_dir)  # curve.jsonl holds the points of one run

    clips, _ = load_clips(params.path(params.paths.data), "train")
    if isinstance(model, MelCodec):  # v2 may hear more voices than the corpus has; v1 keeps its recipe
        clips += extra_voice_clips(cfg.extra_voice_clips, cfg.seed, model.config.sample_rate)
    crop = int(cfg.crop_seconds * model.config.sample_rate)
    total = planned_steps(len(clips), cfg.batch_size, dist_info.world_size, cfg.epochs,
                          max_steps if max_steps is not None else cfg.max_steps)

    net = DistributedDataParallel(trained) if dist_info.world_size > 1 else trained
    tracker = RunTracker.for_training(params, "codec", out_dir, dist_info.is_main, track, step, run_id,
                                      parent_run_id)
    started = time.monotonic()
    with tracked(tracker):
        tracker.log_params({**{f"codec.{k}": v for k, v in params.codec.architecture().items()},
                            **{f"train.{k}": v for k, v in cfg.model_dump().items()},
                            "profile": params.profile, "world_size": dist_info.world_size, "device": device.type,
                            "bitrate_bps": model.bitrate(), "total_steps": total})
        tracker.set_tags(run_tags(params, "codec"))
        if isinstance(model, MelCodec) and step == 0:
            errors = fit_mel_codec(model, clips, cfg.seed, cfg.kmeans_iterations, cfg.gain_augment_db)
            tracker.log_metrics({f"quantizer_mse_{i + 1}_codebooks": e for i, e in enumerate(errors)}, 0)
        bar = tqdm(total=total, initial=step, desc="train codec", unit="step", disable=not dist_info.is_main)
        window_start, window_steps, scoring_seconds = time.monotonic(), 0, 0.0
        model.train()
        while step < total:
            generator = step_generator(cfg.seed, step)  # the global batch, the same on every rank
            batch = random_crops(clips, cfg.batch_size * dist_info.world_size, crop, generator)
            if isinstance(model, MelCodec):
                gains = rank_slice(augment_gains(len(batch), cfg, generator), dist_info)
                batch = rank_slice(batch, dist_info).to(device)
                loss, pred, target, logged = mel_losses(net, model, batch, gains, device)
            else:
                batch = rank_slice(batch, dist_info).to(device)
                loss, pred, target, logged = conv_losses(net, batch, cfg, model.config.sample_rate, device)
            if discriminator is not None:
                disc_optimizer.zero_grad(set_to_none=True)
                d_loss = discriminator.discriminator_loss(target, pred)
                d_loss.backward()
                disc_optimizer.step()
                adv = discriminator.generator_losses(target, pred)
                loss = loss + sum(ADVERSARIAL_WEIGHTS[k] * v for k, v in adv.items())
                logged |= {"disc_loss": float(d_loss), **{k: float(v) for k, v in adv.items()}}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
            optimizer.step()
            step += 1
            window_steps += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                elapsed = time.monotonic() - window_start
                realtime = window_steps * cfg.batch_size * cfg.crop_seconds * dist_info.world_size / max(elapsed, 1e-9)
                tracker.log_metrics({**logged, "audio_x_realtime": realtime,
                                     "step_seconds": elapsed / max(window_steps, 1)}, step)
                bar.set_postfix(loss=f"{logged['loss']:.3f}", xrt=f"{realtime:.0f}")
                window_start, window_steps = time.monotonic(), 0
            if dist_info.is_main and (step % cfg.checkpoint_every == 0 or step == total):
                save_checkpoint(checkpoint_path, model=model.state_dict(), config=model.config_dict(),
                                optimizer=optimizer.state_dict(), step=step, run_id=tracker.run_id,
                                stamp=stamp_text(stamp),
                                discriminator=discriminator.state_dict() if discriminator else None,
                                disc_optimizer=disc_optimizer.state_dict() if disc_optimizer else None)
            if dist_info.is_main and step in cfg.curve_steps:
                scoring_started = time.monotonic()
                figures, _ = evaluate_codec(model, params, device, with_baselines=False)
                point = record_point(out_dir, step, scoring_started - started - scoring_seconds, figures)
                tracker.log_metrics({f"curve_{k}": v for k, v in point.items() if k != "step"}, step)
                save_checkpoint(snapshot_path(out_dir, step), with_rng=False, model=model.state_dict(),
                                config=model.config_dict(), step=step)
                model.train()
                scoring_seconds += time.monotonic() - scoring_started
                window_start = time.monotonic()
        bar.close()
        seconds = time.monotonic() - started - scoring_seconds
        if not dist_info.is_main:
            return CodecTrainResult(str(checkpoint_path), step, seconds, model.bitrate(), {}, {}, None)
        metrics, baselines = evaluate_codec(model, params, device)
        tracker.log_metrics({**{f"test_{k}": v for k, v in metrics.items()},
                             **{f"baseline_{b}_{k}": v for b, m in baselines.items() for k, v in m.items()},
                             **cost_metrics(seconds, device, params.cost, dist_info.world_size)}, step)
        result = CodecTrainResult(str(checkpoint_path), step, seconds, model.bitrate(), metrics, baselines, tracker.run_id)
        atomic.write_json(out_dir / "result.json", asdict(result))
        write_stamp(out_dir, stamp)  # after the result: a crash between leaves no false stamp
        tracker.log_artifact(checkpoint_path, "checkpoints")
        tracker.log_artifact(out_dir / "result.json")
    return result
