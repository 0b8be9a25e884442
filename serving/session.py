"""One conversation with the model: the user's speech in as it arrives, the spoken reply out frame
by frame. The state is explicit (encoder state, the user's codes so far, the voice), in the manner
of kyutai's streaming modules. The pyfunc model (serving/pyfunc.py) and the model-quality
evaluation run it one conversation at a time; the server and the latency gate run the batched
Engine (serving/engine.py) instead, which shares this module's settings, voice checks and reply
budget, and which tests/test_serving.py holds to the same replies as this one-by-one path.

Timeline of a turn:
    feed(chunk) ...        the codec encodes the user's audio while it arrives (encode_step), so
                           at the end of the utterance only the last partial frame is left to code
    end_of_utterance()     flush that frame, then the S2S model generates the reply with its KV
                           cache and every completed frame of codes is decoded at once
                           (decode_step): the first audio leaves after the prefill, K delay steps
                           and one decoder step, not after the whole reply
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from serving.bundle import ModelBundle
from serving.turns import (
    GenerationSettings,
    SessionError,
    check_utterance_length,
    check_voice,
    last_hop,
    reply_budget,
    turn_prompt,
)

# the turn rules' names that callers (app, pyfunc, tasks, tests) import from here, with ReplySession
__all__ = ["GenerationSettings", "ReplySession", "SessionError", "check_voice", "reply_budget"]


class ReplySession:
    """A user's turns in, spoken replies out, in a chosen speaker's voice and emotion."""

    def __init__(self, bundle: ModelBundle, speaker: str = "female_young", emotion: str = "neutral",
                 settings: GenerationSettings | None = None, seed: int | None = None) -> None:
        self.bundle = bundle
        self.settings = settings or GenerationSettings()
        self.device = next(bundle.codec.parameters()).device
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        self.set_voice(speaker, emotion)
        self.hop = bundle.codec.hop_length
        self.reply_text = ""  # what the last reply said (a model with a text stream), CTC-collapsed
        self._reset_turn()

    def set_voice(self, speaker: str, emotion: str) -> None:
        """Choose the voice of the next reply (it may change at every turn)."""
        self.speaker_id, self.emotion_id = check_voice(speaker, emotion)
        self.speaker, self.emotion = speaker, emotion

    def _reset_turn(self) -> None:
        self.encoder_state = self.bundle.codec.init_encoder_state(1)
        self.pending = np.zeros(0, dtype=np.float32)  # samples not yet a whole hop
        self.codes: list[torch.Tensor] = []
        self.samples_in = 0

    @property
    def utterance_seconds(self) -> float:
        return self.samples_in / self.bundle.sample_rate

    @torch.inference_mode()
    def feed(self, audio: np.ndarray) -> None:
        """Take float32 mono audio at the model's sample rate; code every whole frame it completes."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        check_utterance_length(self.samples_in, len(audio), self.bundle.sample_rate, self.settings)
        self.samples_in += len(audio)
        self.pending = np.concatenate([self.pending, audio])
        whole = len(self.pending) - len(self.pending) % self.hop
        if whole:
            self._encode(self.pending[:whole])
            self.pending = self.pending[whole:]

    def _encode(self, samples: np.ndarray) -> None:
        wav = torch.from_numpy(np.ascontiguousarray(samples))[None, None].to(self.device)
        codes, self.encoder_state = self.bundle.codec.encode_step(wav, self.encoder_state)
        if codes.shape[-1]:
            self.codes.append(codes)

    @torch.inference_mode()
    def end_of_utterance(self) -> Iterator[np.ndarray]:
        """Stream the reply: float32 chunks of one codec frame each, as soon as each is decoded.

        The turn is over when the generator is exhausted or closed; the session is then ready
        for the next utterance, and `reply_text` holds what the reply said.
        """
        self.reply_text, text_ids = "", []
        try:
            hop = last_hop(self.pending, self.hop)
            if hop is not None:
                self._encode(hop)
            model = self.bundle.s2s
            prompt = turn_prompt(self.codes, self.settings, self.bundle.codec.frame_rate, model.config)
            speaker = torch.tensor([self.speaker_id], device=self.device)
            emotion = torch.tensor([self.emotion_id], device=self.device)
            decoder_state = self.bundle.codec.init_decoder_state(1)
            frames = model.reply_frames(prompt.user, speaker, emotion, prompt.reply_frames,
                                        self.settings.temperature, self.settings.top_k, self.generator,
                                        prompt.min_frames, self.settings.guidance)
            for frame in frames:
                if frame.text is not None:
                    text_ids.append(int(frame.text[0]))
                audio, decoder_state = self.bundle.codec.decode_step(frame.codes, decoder_state)
                yield audio[0, 0].float().cpu().numpy()
        finally:
            self.reply_text = self.bundle.s2s.config.spoken_text(text_ids)
            self._reset_turn()

    def reply(self, audio: np.ndarray) -> np.ndarray:
        """A whole turn at once: the user's audio in, the complete reply out (for batch use)."""
        self.feed(audio)
        chunks = list(self.end_of_utterance())
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
