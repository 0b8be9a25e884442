"""Guidance distilled into the S2S model (tasks/training/distill_guidance.py) on a tiny corpus: the
student, unguided, comes closer to its teacher's guided distribution than the teacher itself; the
stage is reused when nothing changed, off at 0 steps, and refuses a guidance that is no guidance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.config import load_params

from .conftest import TINY


def _distance_to_guided(model, teacher, batch, guidance: float) -> float:
    """Mean KL(teacher guided || model conditioned) over the batch's non-PAD targets."""
    import torch.nn.functional as F

    from tasks.training.distill_guidance import guided_logits

    inputs, targets, speaker, emotion = batch
    with torch.no_grad():
        target = F.log_softmax(guided_logits(teacher, inputs, speaker, emotion, guidance, None), -1)
        got = F.log_softmax(model(inputs, speaker, emotion).float(), -1)
    pads = torch.tensor(teacher.config.stream_pads)[None, :, None]
    kl = (target.exp() * (target - got)).sum(-1)
    counted = targets != pads
    return float(kl[counted].mean())


def test_the_distilled_model_unguided_is_closer_to_the_guided_teacher(tiny_corpus: Path, project_root: Path):
    from models.s2s_transformer import S2SConfig, S2STransformer
    from tasks.release.candidate import load_results
    from tasks.training.distill_guidance import distill_guidance, guided_logits
    from tasks.training.train_codec import train_codec
    from tasks.training.train_s2s import load_pairs, make_batch, train_s2s

    distill = {"steps": 16, "guidance": 3.0, "lr": 0.003, "checkpoint_every": 8}
    params = load_params("smoke", {**TINY, "codec_train": {**TINY["codec_train"], "max_steps": 4},
                                   "s2s_distill": distill})
    train_codec(params, track=False)
    s2s = train_s2s(params, track=False)
    result = distill_guidance(params, s2s, track=False)
    assert result.steps == 16 and Path(result.checkpoint).parent == project_root / "artifacts/s2s-distill"
    assert result.metrics["teacher_cross_entropy"] == pytest.approx(s2s.metrics["cross_entropy"])
    assert result.seconds > s2s.seconds   # the model's training time includes its teacher's

    def load(path: str) -> S2STransformer:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = S2STransformer(S2SConfig(**state["config"]))
        model.load_state_dict(state["model"])
        return model.eval()

    teacher, student = load(s2s.checkpoint), load(result.checkpoint)
    pairs = load_pairs(params, project_root / "artifacts/tokens", "train")
    batch = make_batch(pairs, list(range(len(pairs))), teacher.config)
    before = _distance_to_guided(teacher, teacher, batch, 3.0)
    after = _distance_to_guided(student, teacher, batch, 3.0)
    assert before > 0 and after < 0.7 * before, (before, after)

    # dropped rows are matched to the teacher's own unconditioned distribution
    inputs, _, speaker, emotion = batch
    dropped = torch.tensor([True] + [False] * (len(pairs) - 1))
    mixed = guided_logits(teacher, inputs, speaker, emotion, 3.0, dropped)
    with torch.no_grad():
        free = teacher(inputs, torch.full_like(speaker, teacher.config.null_speaker),
                       torch.full_like(emotion, teacher.config.null_emotion))
    assert torch.allclose(mixed[0], free[0].float(), atol=1e-5)
    assert not torch.allclose(mixed[1], free[1].float(), atol=1e-3)

    # nothing changed: reused; the gates and bundle take the distilled model
    again = distill_guidance(params, s2s, track=False)
    assert again.cached and again.checkpoint == result.checkpoint
    assert load_results(params)[1].checkpoint == result.checkpoint
    assert json.loads((project_root / "artifacts/s2s-distill/result.json").read_text())["steps"] == 16

    off = load_params("smoke", {**TINY, "codec_train": {**TINY["codec_train"], "max_steps": 4}})
    assert distill_guidance(off, s2s, track=False) is s2s
    assert load_results(off)[1].checkpoint == s2s.checkpoint
    none = load_params("smoke", {**TINY, "codec_train": {**TINY["codec_train"], "max_steps": 4},
                                 "s2s_distill": {**distill, "guidance": 1.0}})
    with pytest.raises(ValueError, match="s2s_distill.guidance must be above 1"):
        distill_guidance(none, s2s, track=False)


def test_negative_distillation_steps_are_refused():
    from core.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="steps"):
        load_params("smoke", {"s2s_distill": {"steps": -1}})
