"""The turn rules (serving.turns) that ReplySession and the Engine share: length, emptiness, the
last partial hop, the reply budget and the cropping of a long turn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.s2s_transformer import S2SConfig
from serving.turns import (
    GenerationSettings,
    SessionError,
    check_utterance_length,
    last_hop,
    reply_budget,
    turn_prompt,
)

CONFIG = S2SConfig(n_codebooks=2, codebook_size=16, d_model=16, n_layers=1, n_heads=2, max_len=128)
FRAME_RATE = 50.0


def test_an_utterance_may_reach_the_limit_but_not_pass_it():
    settings = GenerationSettings(max_utterance_seconds=1.0)
    check_utterance_length(8000, 8000, 16000, settings)  # exactly 1 s
    with pytest.raises(SessionError, match=r"^utterance longer than 1 s: send end of utterance sooner$") as info:
        check_utterance_length(8000, 8001, 16000, settings)
    assert info.value.code == "utterance_too_long"
    with pytest.raises(SessionError, match="longer than 1 s: this turn is dropped; send end"):
        check_utterance_length(16000, 1, 16000, settings, drops_turn=True)


def test_the_last_partial_hop_is_padded_with_silence():
    assert last_hop(np.zeros(0, dtype=np.float32), 320) is None
    pending = np.arange(1, 101, dtype=np.float32)
    hop = last_hop(pending, 320)
    assert hop is not None and hop.shape == (320,) and hop.dtype == np.float32
    assert np.array_equal(hop[:100], pending) and not hop[100:].any()


def test_the_reply_budget_splits_the_context():
    positions = CONFIG.max_len - CONFIG.sequence_length(0, 0) - 1  # 123
    assert reply_budget(GenerationSettings(max_reply_seconds=0.5, min_reply_seconds=0.1), FRAME_RATE, CONFIG) \
        == (25, positions - 25, 5)
    assert reply_budget(GenerationSettings(max_reply_seconds=60.0, min_reply_seconds=0.1), FRAME_RATE, CONFIG) \
        == (positions // 2, positions - positions // 2, 5), "the reply gets at most half"
    assert reply_budget(GenerationSettings(max_reply_seconds=0.1, min_reply_seconds=1.0), FRAME_RATE, CONFIG)[2] \
        == 5, "never more minimum than maximum"


def test_a_turn_prompt_answers_the_end_of_a_long_turn():
    settings = GenerationSettings(max_reply_seconds=0.5, min_reply_seconds=0.1)
    reply_frames, room, min_frames = reply_budget(settings, FRAME_RATE, CONFIG)
    codes = [torch.full((1, 2, 1), i % 16) for i in range(room + 7)]
    prompt = turn_prompt(codes, settings, FRAME_RATE, CONFIG)
    assert (prompt.reply_frames, prompt.min_frames) == (reply_frames, min_frames)
    assert torch.equal(prompt.user, torch.cat(codes, dim=-1)[:, :, 7:]) and prompt.user.shape[-1] == room
    short = turn_prompt(codes[:3], settings, FRAME_RATE, CONFIG)
    assert torch.equal(short.user, torch.cat(codes[:3], dim=-1))
    with pytest.raises(SessionError, match="end of utterance before any audio") as info:
        turn_prompt([], settings, FRAME_RATE, CONFIG)
    assert info.value.code == "empty_utterance"
