"""The rules of a turn, for both ways of serving one: ReplySession (one conversation at a time) and
the Engine (every conversation, batched). Which voices exist, when an utterance is too long or
empty, how its last partial hop is coded and how much of it the reply answers live here once, so
the two paths refuse the same turns and answer the same prompts (the batched-equals-one-by-one
test depends on it). What a refusal then does to the conversation is each path's own business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.labels import EMOTIONS, SPEAKERS


class SessionError(ValueError):
    """Input a session refuses; `code` is a stable name a protocol can send back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class GenerationSettings:
    temperature: float = 0.8
    top_k: int | None = 50
    max_reply_seconds: float = 8.0
    max_utterance_seconds: float = 15.0
    min_reply_seconds: float = 0.2  # no empty replies: EOS is held back this long
    guidance: float = 1.0           # classifier-free guidance on the voice controls; 1 = off (guidable models)

    @classmethod
    def from_params(cls, serving: Any, recorded: dict[str, Any] | None = None) -> "GenerationSettings":
        """The serving section's settings; with `serving.sampling: model`, the temperature, top-k
        and guidance a bundle records (chosen on the validation split) replace params.yaml's."""
        chosen = recorded if recorded and getattr(serving, "sampling", "params") == "model" else {}
        return cls(chosen.get("temperature", serving.temperature), chosen.get("top_k", serving.top_k),
                   serving.max_reply_seconds, serving.max_utterance_seconds, serving.min_reply_seconds,
                   chosen.get("guidance", serving.guidance))


def check_voice(speaker: str, emotion: str) -> tuple[int, int]:
    """The ids of a checklist speaker and emotion, or a SessionError naming the valid ones."""
    if speaker not in SPEAKERS:
        raise SessionError("unknown_speaker", f"unknown speaker {speaker!r}: one of {', '.join(SPEAKERS)}")
    if emotion not in EMOTIONS:
        raise SessionError("unknown_emotion", f"unknown emotion {emotion!r}: one of {', '.join(EMOTIONS)}")
    return SPEAKERS.index(speaker), EMOTIONS.index(emotion)


def check_utterance_length(samples_in: int, more: int, sample_rate: int, settings: GenerationSettings,
                           drops_turn: bool = False) -> None:
    """A SessionError (utterance_too_long) when `more` samples would take a turn of `samples_in`
    past max_utterance_seconds. `drops_turn` says so in the message: the engine, which takes
    audio in the background, drops the whole turn; a session only refuses the chunk."""
    limit = settings.max_utterance_seconds
    if (samples_in + more) / sample_rate > limit:
        consequence = "this turn is dropped; " if drops_turn else ""
        raise SessionError("utterance_too_long",
                           f"utterance longer than {limit:g} s: {consequence}send end of utterance sooner")


def last_hop(pending: np.ndarray, hop: int) -> np.ndarray | None:
    """The samples left at the end of an utterance, padded with silence to the one whole hop the
    encoder codes; None when the audio ended on a hop boundary."""
    return np.pad(pending, (0, hop - len(pending))) if len(pending) else None


def reply_budget(settings: GenerationSettings, frame_rate: float, config: Any) -> tuple[int, int, int]:
    """(reply frames, user frames, minimum reply frames) that fit the model's context: the reply
    gets what the settings ask for but at most half, so a long user turn is cropped rather than
    refused. One position is kept spare: the engine feeds the last step's tokens too."""
    positions = config.max_len - config.sequence_length(0, 0) - 1
    reply = min(max(1, int(settings.max_reply_seconds * frame_rate)), positions // 2)
    return reply, positions - reply, min(reply, int(settings.min_reply_seconds * frame_rate))


@dataclass(frozen=True)
class Prompt:
    """What the model is asked at the end of a turn."""

    user: torch.Tensor  # (1, K, T) the user's codes the reply answers
    reply_frames: int   # the reply ends here at the latest
    min_frames: int     # and not before this


def turn_prompt(codes: list[torch.Tensor], settings: GenerationSettings, frame_rate: float,
                config: Any) -> Prompt:
    """The prompt of a turn whose coded frames are `codes`: its end, cropped to what fits beside
    the reply (the end of a long turn is what the reply answers); a SessionError (empty_utterance)
    when nothing was said."""
    if not codes:
        raise SessionError("empty_utterance", "end of utterance before any audio: nothing to reply to")
    reply_frames, room, min_frames = reply_budget(settings, frame_rate, config)
    return Prompt(torch.cat(codes, dim=-1)[:, :, -room:], reply_frames, min_frames)
