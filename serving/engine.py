"""The serving engine: one thread owns the model and steps every live conversation in batches.

Sessions never call the model themselves. They post commands (audio, end of utterance, voice,
close) and receive events (reply audio frames, end of reply with its metrics, errors). Each tick
of the engine thread:

1. applies the commands that arrived;
2. encodes the users' audio: one hop from every session that has one, as one batch, repeated
   while audio is waiting (encoding happens while people speak);
3. starts the replies of finished utterances: the prompt goes into a free row of the shared
   SlotCache (`prefill_row`);
4. steps every replying row at once: one S2S step for all rows (`step_rows`, each row at its own
   position), then one codec decoder step for every row that completed a frame. A finished row
   is refilled by moving the last row into it, so the batch stays a contiguous slice.

With `batching=False` step 4 runs row by row instead (the same code with batches of one): the
baseline that shows what cross-session batching buys.

Per-conversation state is explicit (its encoder and decoder state rows, the delay-pattern
bookkeeping of its KV row), in the manner of kyutai's streaming modules; the codec's states of
all sessions live in row buffers (RowStates) that a step gathers from and writes back to.

Over 400 lines: the engine is one scheduler (admission, encode, batched steps, decode, delivery)
whose stages share its slot and cache state; split, each part would reach into the others.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from models.s2s_transformer import sample
from serving.bundle import ModelBundle
from serving.session import GenerationSettings, SessionError, check_voice, reply_budget

log = logging.getLogger(__name__)
MAX_ENCODE_ROUNDS = 16  # hops encoded per tick before replies get their step


def map_state(fn: Callable[..., Any], *states: Any) -> Any:
    """Apply `fn` to the tensors of streaming states (nested lists of dataclasses of tensors)."""
    first = states[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return fn(*states)
    if isinstance(first, list):
        return [map_state(fn, *parts) for parts in zip(*states)]
    if is_dataclass(first):
        return replace(first, **{f.name: map_state(fn, *(getattr(x, f.name) for x in states)) for f in fields(first)})
    raise TypeError(f"cannot map over a state of type {type(first).__name__}")


class RowStates:
    """Streaming states of many conversations as one batch of rows: a step gathers the rows it
    needs (index_select), runs, and writes them back (index_copy_), a fixed number of tensor ops
    whatever the number of sessions."""

    def __init__(self, state: Any) -> None:
        self.state = state  # every tensor is (rows, ...)

    def gather(self, index: torch.Tensor) -> Any:
        return map_state(lambda t: t.index_select(0, index), self.state)

    def scatter(self, index: torch.Tensor, part: Any) -> None:
        map_state(lambda t, p: t.index_copy_(0, index, p), self.state, part)

    def reset(self, row: int) -> None:
        map_state(lambda t: t[row].zero_(), self.state)  # initial states are zeros

    def move(self, src: int, dst: int) -> None:
        map_state(lambda t: t[dst].copy_(t[src]), self.state)


@dataclass
class ReplyEvent:
    kind: str                          # "audio" | "end" | "error"
    pcm: np.ndarray | None = None      # float32 samples of one codec frame
    metrics: dict[str, float] | None = None
    code: str = ""
    message: str = ""


@dataclass
class Conversation:
    """One session's state inside the engine."""

    id: int
    emit: Callable[[ReplyEvent], None]
    speaker_id: int
    emotion_id: int
    slot: int                          # its row in the engine's encoder states
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    codes: list[torch.Tensor] = field(default_factory=list)
    samples_in: int = 0
    end_at: float | None = None        # when end of utterance arrived (the latency clock)
    row: int | None = None             # its row in the SlotCache while replying
    first_audio_at: float | None = None
    frames_out: int = 0
    discard: bool = False              # the turn was refused: drop its audio until the next turn


class Engine:
    """Batches the model work of every live session; thread-safe `post_*` methods feed it."""

    def __init__(self, bundle: ModelBundle, settings: GenerationSettings, max_sessions: int = 128,
                 batching: bool = True, threads: int = 1, seed: int = 0) -> None:
        self.bundle, self.settings, self.batching, self.threads = bundle, settings, batching, threads
        self.codec, self.s2s = bundle.codec, bundle.s2s
        self.device = next(self.s2s.parameters()).device
        self.hop = self.codec.hop_length
        self.max_sessions = max_sessions
        config = self.s2s.config
        self.n_codebooks = config.n_codebooks
        self.cache = self.s2s.init_slots(max_sessions)
        self.hidden = torch.zeros(max_sessions, 1, config.d_model, device=self.device)
        self.owner: list[Conversation | None] = [None] * max_sessions
        rows = max_sessions
        self.step = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.eos_frame = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.min_frames = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.max_frames = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.ring = torch.zeros(rows, config.n_codebooks, config.n_codebooks, dtype=torch.long, device=self.device)
        self.live = 0                              # rows 0..live-1 are replying
        self.allowed = torch.zeros(config.n_codebooks, config.vocab_size, dtype=torch.bool, device=self.device)
        self.allowed[:, : config.codebook_size] = True
        self.allowed[0, config.eos_id] = True
        self.lag = torch.arange(config.n_codebooks, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.encoder_states = RowStates(self.codec.init_encoder_state(max_sessions))
        self.decoder_states = RowStates(self.codec.init_decoder_state(max_sessions))  # aligned with KV rows
        self.free_slots = list(range(max_sessions - 1, -1, -1))
        self.conversations: dict[int, Conversation] = {}
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.ids = itertools.count(1)
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="s2s-engine", daemon=True)
        self.ticks = 0
        self.batch_sizes: list[int] = []

    # --- the sessions' side (any thread) --------------------------------------------------------

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)

    def open(self, speaker: str, emotion: str, emit: Callable[[ReplyEvent], None]) -> int:
        """A new conversation; `emit` receives its events (on the engine thread: make it cheap)."""
        speaker_id, emotion_id = check_voice(speaker, emotion)
        conversation_id = next(self.ids)
        self._post(("open", conversation_id, speaker_id, emotion_id, emit))
        return conversation_id

    def post_audio(self, conversation_id: int, pcm: np.ndarray) -> None:
        self._post(("audio", conversation_id, np.asarray(pcm, dtype=np.float32).reshape(-1)))

    def post_end(self, conversation_id: int) -> None:
        self._post(("end", conversation_id, time.perf_counter()))

    def post_voice(self, conversation_id: int, speaker: str, emotion: str) -> None:
        self._post(("voice", conversation_id, *check_voice(speaker, emotion)))

    def close(self, conversation_id: int) -> None:
        self._post(("close", conversation_id))

    def wait_encoded(self, conversation_id: int, timeout: float = 30.0) -> None:
        """Block until the audio posted so far for this conversation is encoded (what has happened
        by the end of an utterance spoken in real time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conversation = self.conversations.get(conversation_id)
            if self.commands.empty() and conversation is not None and len(conversation.pending) < self.hop:
                return
            time.sleep(0.001)
        raise TimeoutError(f"conversation {conversation_id}: audio not encoded within {timeout} s")

    @property
    def replying(self) -> int:
        return self.live

    def _post(self, command: tuple) -> None:
        self.commands.put(command)
        self.wake.set()

    # --- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self.stopping:
                self.wake.clear()  # before the tick: a command posted during it sets it again
                try:
                    worked = self.tick()
                except Exception as exc:  # a bug must not silently stall every session
                    log.exception("engine tick failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
                    worked = True
                if not worked:
                    self.wake.wait(0.05)

    def _fail_all(self, reason: str) -> None:
        """After an internal error: end every reply in flight with an error; sessions go on."""
        for row in range(self.live - 1, -1, -1):
            conversation = self.owner[row]
            self._free_row(row)
            if conversation is not None:
                conversation.emit(ReplyEvent("error", code="internal_error", message=f"reply failed: {reason}"))

    def tick(self) -> bool:
        """One round of work; returns whether there was any."""
        worked = self._apply_commands()
        worked |= self._encode()
        worked |= self._start_replies()
        if self.live:
            groups = [slice(0, self.live)] if self.batching else [slice(i, i + 1) for i in range(self.live)]
            finished: list[int] = []
            for rows in groups:
                finished += self._step(rows)
            for row in sorted(finished, reverse=True):
                self._free_row(row)
            worked = True
        self.ticks += worked
        return worked

    def _apply_commands(self) -> bool:
        worked = False
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return worked
            worked = True
            kind, cid = command[0], command[1]
            if kind == "open":
                if not self.free_slots:
                    command[4](ReplyEvent("error", code="server_full", message="no free engine slot"))
                    continue
                slot = self.free_slots.pop()
                self.encoder_states.reset(slot)
                self.conversations[cid] = Conversation(cid, command[4], command[2], command[3], slot)
                continue
            conversation = self.conversations.get(cid)
            if conversation is None:
                continue
            if kind == "audio":
                self._take_audio(conversation, command[2])
            elif kind == "end":
                if conversation.discard:  # the end of a turn already refused: say so again, start afresh
                    conversation.discard = False
                    self._reset_turn(conversation)
                    conversation.emit(ReplyEvent("error", code="utterance_too_long",
                                                 message="this turn was dropped for being too long: nothing to "
                                                         "reply to; speak again"))
                elif conversation.row is None:
                    conversation.end_at = command[2]
            elif kind == "voice":
                conversation.speaker_id, conversation.emotion_id = command[2], command[3]
            elif kind == "close":
                if conversation.row is not None:
                    self._free_row(conversation.row)
                self.free_slots.append(conversation.slot)
                del self.conversations[cid]

    def _take_audio(self, conversation: Conversation, pcm: np.ndarray) -> None:
        if conversation.discard or conversation.end_at is not None or conversation.row is not None:
            return  # audio during a reply (or of a refused turn) is not part of the next utterance
        limit = self.settings.max_utterance_seconds
        if (conversation.samples_in + len(pcm)) / self.bundle.sample_rate > limit:
            conversation.emit(ReplyEvent("error", code="utterance_too_long",
                                         message=f"utterance longer than {limit:g} s: this turn is dropped; "
                                                 "send end of utterance sooner"))
            self._reset_turn(conversation)
            conversation.discard = True
            return
        conversation.samples_in += len(pcm)
        conversation.pending = np.concatenate([conversation.pending, pcm])

    def _reset_turn(self, conversation: Conversation) -> None:
        self.encoder_states.reset(conversation.slot)
        conversation.pending = np.zeros(0, dtype=np.float32)
        conversation.codes, conversation.samples_in, conversation.end_at = [], 0, None

    def _encode(self) -> bool:
        worked = False
        for _ in range(MAX_ENCODE_ROUNDS):
            ready = [c for c in self.conversations.values() if len(c.pending) >= self.hop and c.row is None]
            if not ready:
                break
            self._encode_batch(ready, [c.pending[: self.hop] for c in ready])
            for c in ready:
                c.pending = c.pending[self.hop:]
            worked = True
        return worked

    def _encode_batch(self, conversations: list[Conversation], hops: list[np.ndarray]) -> None:
        wav = torch.from_numpy(np.stack(hops))[:, None].to(self.device)
        index = torch.tensor([c.slot for c in conversations], device=self.device)
        codes, state = self.codec.encode_step(wav, self.encoder_states.gather(index))
        self.encoder_states.scatter(index, state)
        if codes.shape[-1]:
            for c, code in zip(conversations, codes.split(1)):
                c.codes.append(code)

    def _start_replies(self) -> bool:
        worked = False
        for c in list(self.conversations.values()):
            if c.end_at is None or c.row is not None or len(c.pending) >= self.hop:
                continue
            if self.live >= self.max_sessions:
                break
            worked = True
            if len(c.pending):
                self._encode_batch([c], [np.pad(c.pending, (0, self.hop - len(c.pending)))])
                c.pending = c.pending[:0]
            if not c.codes:
                c.emit(ReplyEvent("error", code="empty_utterance",
                                  message="end of utterance before any audio: nothing to reply to"))
                self._reset_turn(c)
                continue
            self._prefill(c)
        return worked

    def _prefill(self, c: Conversation) -> None:
        reply_frames, room, min_frames = reply_budget(self.settings, self.codec.frame_rate, self.s2s.config)
        user = torch.cat(c.codes, dim=-1)[:, :, -room:]  # the end of a long turn is what the reply answers
        row = self.live
        self.live += 1
        self.owner[row], c.row = c, row
        speaker = torch.tensor([c.speaker_id], device=self.device)
        emotion = torch.tensor([c.emotion_id], device=self.device)
        self.hidden[row] = self.s2s.prefill_row(self.cache, row, user, speaker, emotion)[0]
        self.step[row], self.min_frames[row], self.max_frames[row] = 0, min_frames, reply_frames
        self.eos_frame[row] = reply_frames + self.n_codebooks  # "never"
        self.decoder_states.reset(row)
        c.first_audio_at, c.frames_out = None, 0

    def _step(self, rows: slice) -> list[int]:
        """One generation step for `rows`: sample, emit completed frames, advance; returns the rows
        whose reply ended."""
        config = self.s2s.config
        count = rows.stop - rows.start
        self.batch_sizes.append(count)
        step, eos_frame = self.step[rows], self.eos_frame[rows]
        logits = self.s2s.logits(self.hidden[rows]).masked_fill(~self.allowed, float("-inf"))
        hold = step < self.min_frames[rows]
        logits[:, 0, config.eos_id] = logits[:, 0, config.eos_id].masked_fill(hold, float("-inf"))
        sampled = sample(logits, self.settings.temperature, self.settings.top_k, self.generator)
        never = self.max_frames[rows] + self.n_codebooks
        ends = (sampled[:, 0] == config.eos_id) | (step == self.max_frames[rows])
        eos_frame = torch.where((eos_frame == never) & ends, step, eos_frame)
        frame = step[:, None] - self.lag[None]
        token = torch.where(frame == eos_frame[:, None], config.eos_id, sampled)
        token = torch.where((frame < 0) | (frame > eos_frame[:, None]), config.pad_id, token)
        self.ring[rows, :, :].scatter_(2, (step % self.n_codebooks)[:, None, None].expand(-1, self.n_codebooks, 1),
                                       token[:, :, None])
        done = step - (self.n_codebooks - 1)
        finished = [rows.start + i for i in torch.nonzero((done >= 0) & (eos_frame <= done)).flatten().tolist()]
        emitting = torch.nonzero((done >= 0) & (eos_frame > done)).flatten().tolist()
        if emitting:
            index = torch.tensor(emitting, device=self.device)
            slots = (done[index, None] + self.lag[None]) % self.n_codebooks  # codebook k's token of frame `done`
            codes = self.ring[rows][index].gather(2, slots[:, :, None])          # (e, K, 1)
            self._decode([rows.start + i for i in emitting], codes)
            finished += [rows.start + i for i in emitting if int(eos_frame[i]) <= int(done[i]) + 1]
        self.eos_frame[rows] = eos_frame
        self.step[rows] = step + 1
        self.hidden[rows] = self.s2s.step_rows(self.cache, rows, token[:, :, None])
        return sorted(set(finished))

    def _decode(self, rows: list[int], codes: torch.Tensor) -> None:
        """One codec decoder step for these rows' completed frames (e, K, 1), sent to their sessions."""
        index = torch.tensor(rows, device=self.device)
        audio, state = self.codec.decode_step(codes, self.decoder_states.gather(index))
        self.decoder_states.scatter(index, state)
        now = time.perf_counter()
        for row, samples in zip(rows, audio[:, 0].float().cpu().numpy()):
            c = self.owner[row]
            if c.first_audio_at is None:
                c.first_audio_at = now
            c.frames_out += 1
            c.emit(ReplyEvent("audio", pcm=samples))

    def _free_row(self, row: int) -> None:
        """End the reply in `row` (its metrics go out) and move the last live row into it."""
        c = self.owner[row]
        if c is not None:
            if c.end_at is not None and c.first_audio_at is not None:
                seconds = c.frames_out * self.hop / self.bundle.sample_rate
                c.emit(ReplyEvent("end", metrics={
                    "first_audio_ms": (c.first_audio_at - c.end_at) * 1000,
                    "reply_seconds": seconds, "frames": c.frames_out,
                    "reply_realtime_factor": seconds / max(time.perf_counter() - c.end_at, 1e-9)}))
            c.row = None
            self._reset_turn(c)
        last = self.live - 1
        if row != last:
            self.cache.move_row(last, row)
            self.decoder_states.move(last, row)
            for buffer in (self.hidden, self.step, self.eos_frame, self.min_frames, self.max_frames, self.ring):
                buffer[row] = buffer[last]
            moved = self.owner[last]
            self.owner[row] = moved
            if moved is not None:
                moved.row = row
        self.owner[last] = None
        self.live -= 1


__all__ = ["Engine", "ReplyEvent", "RowStates", "SessionError", "map_state"]
