"""One reply step under the delay pattern: what each stream emits, when a reply ends, where EOS goes.

S2STransformer.generate (every row in lockstep) and the serving engine (each row at its own step,
rows joining and leaving) both call `DelayStepper.step`, so the rule exists once and a batch of
replies is the same as the replies one by one. Rows are the unit: the single-session path is B=1.

The rule (see models/s2s_transformer.py for the layout): stream s is s steps behind stream 0, so
at step s' it is at frame s' - s. The streams are the K codebooks, or, in a model with a text
stream, the text (stream 0: the character spoken in the frame, predicted first) and then the K
codebooks one step later. Only codebook 0 may sample EOS, and not before `min_frames`; a row's
reply ends at the frame where codebook 0 says EOS, or at `max_frames`. Each stream then writes its
end token when it reaches that frame and its pad after it (and before its first frame). The
frame that is complete at step s' is s' - (S-1); the last S columns are kept in a ring to read it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F


class TokenLayout(Protocol):
    """The part of S2SConfig the rule needs (a protocol, so this module imports no model)."""

    n_codebooks: int
    codebook_size: int
    text_stream: bool

    @property
    def pad_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def n_streams(self) -> int: ...

    @property
    def logit_width(self) -> int: ...

    @property
    def text_vocab_size(self) -> int: ...

    @property
    def stream_pads(self) -> list[int]: ...


TEXT_PAD = 0  # the text stream's "no character in this frame" (the aligner's CTC blank)


@dataclass
class DelayState:
    """Per-row bookkeeping of replies in progress, every tensor (rows, ...). A server keeps one
    for all its rows and steps a slice of it (`rows`); generate keeps one for its batch."""

    step: Tensor        # (rows,) steps taken in the current reply
    eos_frame: Tensor   # (rows,) the frame that is EOS; max_frames + S ("never") until known
    min_frames: Tensor  # (rows,) EOS is held back before this frame
    max_frames: Tensor  # (rows,) the reply ends here at the latest
    ring: Tensor        # (rows, S, S) the tokens of the last S steps, step s in column s % S

    @classmethod
    def empty(cls, rows: int, n_streams: int, device: torch.device | str | None = None) -> "DelayState":
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        return cls(zeros(rows), zeros(rows), zeros(rows), zeros(rows), zeros(rows, n_streams, n_streams))

    def begin(self, rows: int | slice, min_frames: int, max_frames: int) -> None:
        """Start a reply in `rows`: step 0, its end not yet known."""
        self.step[rows], self.min_frames[rows], self.max_frames[rows] = 0, min_frames, max_frames
        self.eos_frame[rows] = max_frames + self.ring.shape[1]

    def rows(self, rows: slice) -> "DelayState":
        """A view of a contiguous slice of rows: stepping it updates this state in place."""
        return DelayState(self.step[rows], self.eos_frame[rows], self.min_frames[rows], self.max_frames[rows],
                          self.ring[rows])

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (the engine refills a finished row with its last one)."""
        for tensor in (self.step, self.eos_frame, self.min_frames, self.max_frames, self.ring):
            tensor[dst] = tensor[src]


@dataclass
class StepOutput:
    """What one step did, per row."""

    tokens: Tensor       # (B, S) the column the step wrote: the model's next input
    frames: Tensor       # (B, K) the audio codes of the frame this step completed; meaningful only where `emitted`
    text: Tensor | None  # (B,) that frame's text id (TEXT_PAD: no character); None without a text stream
    emitted: Tensor      # (B,) bool: this step completed a frame of the reply
    ended: Tensor        # (B,) bool: the reply has no frame after this step's: free the row


class DelayStepper:
    """The delay/EOS rule for one token layout, with its constant masks built once per device."""

    def __init__(self, layout: TokenLayout, device: torch.device | str | None = None) -> None:
        self.n_streams, self.eos_id = layout.n_streams, layout.eos_id
        self.first = 1 if layout.text_stream else 0  # codebook 0's stream: it alone decides the end
        self.allowed = torch.zeros(self.n_streams, layout.logit_width, dtype=torch.bool, device=device)
        self.allowed[self.first:, : layout.codebook_size] = True  # codes only: gaps and EOS follow from codebook 0
        self.allowed[self.first, layout.eos_id] = True
        if layout.text_stream:
            self.allowed[0, : layout.text_vocab_size] = True  # characters and TEXT_PAD
        self.lag = torch.arange(self.n_streams, device=device)  # stream s is s steps behind stream 0
        self.pads = torch.tensor(layout.stream_pads, device=device)
        self.ends = torch.tensor([TEXT_PAD] * self.first + [layout.eos_id] * layout.n_codebooks, device=device)

    def step(self, state: DelayState, logits: Tensor, temperature: float, top_k: int | None,
             generator: torch.Generator | None) -> StepOutput:
        """Sample one column from next-token `logits` (B, S, W) for the B rows of `state` and
        advance them (in place)."""
        step, eos_frame, max_frames = state.step, state.eos_frame, state.max_frames
        frame = step[:, None] - self.lag[None]  # the frame each stream is at
        first_frame = frame[:, self.first]
        logits = logits.masked_fill(~self.allowed, float("-inf"))
        hold = first_frame < state.min_frames
        logits[:, self.first, self.eos_id] = logits[:, self.first, self.eos_id].masked_fill(hold, float("-inf"))
        sampled = sample(logits, temperature, top_k, generator)
        never = max_frames + self.n_streams
        ends = (sampled[:, self.first] == self.eos_id) | (first_frame == max_frames)
        eos_frame = torch.where((eos_frame == never) & ends, first_frame, eos_frame)
        token = torch.where(frame == eos_frame[:, None], self.ends[None], sampled)
        token = torch.where((frame < 0) | (frame > eos_frame[:, None]), self.pads[None], token)  # delay gaps
        column = (step % self.n_streams)[:, None, None].expand(-1, self.n_streams, 1)
        state.ring.scatter_(2, column, token[:, :, None])
        done = step - (self.n_streams - 1)  # the frame completed by this step
        slots = (done[:, None] + self.lag[None]) % self.n_streams  # stream s's column of that frame
        frames = state.ring.gather(2, slots[:, :, None])[:, :, 0]
        emitted = (done >= 0) & (eos_frame > done)
        ended = (done >= 0) & (eos_frame <= done + 1)
        state.eos_frame.copy_(eos_frame)
        state.step.add_(1)
        return StepOutput(token, frames[:, self.first:], frames[:, 0] if self.first else None, emitted, ended)


def sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Token ids (...) from logits (..., V): greedy for temperature 0 or top_k 1.

    With top-k, the draw is among the k best ids only (softmax over their logits, then the id at
    the drawn place): the same distribution as masking the rest, at a fraction of the cost of a
    softmax and a multinomial over all V (measured in docs/history.md, serving engine levers)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, ids = torch.topk(logits, top_k, dim=-1)
        probs = F.softmax(values, dim=-1).flatten(0, -2)
        place = torch.multinomial(probs, 1, generator=generator)
        return ids.flatten(0, -2).gather(1, place).view(logits.shape[:-1])
    probs = F.softmax(logits, dim=-1).flatten(0, -2)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
