"""The serving engine: one thread owns the model and steps every live conversation in batches.

Sessions never call the model themselves. They post commands (audio, end of utterance, voice,
close) and receive events (reply audio frames, end of reply with its metrics, errors). Each tick
of the engine thread:

1. applies the commands that arrived;
2. encodes the users' audio: whole hops (`encode_hops` at a time) from every session that has
   them, as one batch per chunk length, repeated while audio is waiting (encoding happens while
   people speak);
3. starts the replies of finished utterances: the prompt goes into a free row of the shared
   SlotCache (`prefill_row`);
4. steps every replying row at once: one S2S step for all rows (`step_rows`, each row at its own
   position), then one codec decoder step for every row that completed a frame. A finished row
   is refilled by moving the last row into it, so the batch stays a contiguous slice.

With `batching=False` step 4 runs row by row instead (the same code with batches of one): the
baseline that shows what cross-session batching buys.

Two levers spend the CPU where a listener notices it (docs/benchmarks.md measures each):

- deadline scheduling (`ahead_ms` > 0): a reply whose client already holds more than `ahead_ms`
  of audio ahead of real-time playback waits a tick; a new reply (no frame out yet) and a reply
  about to run dry always step. The rows that step are grouped into contiguous slices (serving.
  schedule), so the KV rows are still read in place. A reply's numbers do not change, only when
  its steps run.
- chunked encoding (`encode_hops` > 1): while a user is still speaking, their audio is encoded
  once `encode_hops` whole hops are waiting, in one call; at end of utterance the rest at once.
  The codec's streaming encoder is exact across chunk sizes, so the codes are the same.

`profile` adds up the seconds of each part of a tick (encode, S2S step, decode, the rest): the
figures of `s2s bench engine` and of /stats. The step rule (models.delay_step) and the turn rules
(serving.turns) are the ones ReplySession runs, so a batched reply equals a lone one.

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

from models.delay_step import DelayState, DelayStepper
from serving.bundle import ModelBundle
from serving.schedule import TickProfile, due_slices
from serving.turns import (
    GenerationSettings,
    Prompt,
    SessionError,
    check_utterance_length,
    check_voice,
    last_hop,
    turn_prompt,
)

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


def as_slice(index: torch.Tensor) -> slice | None:
    """`index` as a slice when it is a run of consecutive rows (the usual case: every live row
    completed a frame, or sessions opened one after another), else None."""
    n = len(index)
    if n == 0:
        return None
    first = int(index[0])
    if int(index[-1]) - first + 1 != n or (n > 1 and not bool((index.diff() == 1).all())):
        return None
    return slice(first, first + n)


class RowStates:
    """Streaming states of many conversations as one batch of rows: a step gathers the rows it
    needs (index_select), runs, and writes them back (index_copy_), a fixed number of tensor ops
    whatever the number of sessions. A run of consecutive rows is read in place (a view) and
    written back with one copy: the same numbers without the gather's copy (at 100 rows of the v2
    decoder's state, 1.0 ms of CPU down to 0.1 ms; docs/history.md)."""

    def __init__(self, state: Any) -> None:
        self.state = state  # every tensor is (rows, ...)

    def gather(self, index: torch.Tensor) -> Any:
        rows = as_slice(index)
        if rows is not None:  # a view: the codec's step builds its new state in new tensors
            return map_state(lambda t: t[rows], self.state)
        return map_state(lambda t: t.index_select(0, index), self.state)

    def scatter(self, index: torch.Tensor, part: Any) -> None:
        rows = as_slice(index)
        if rows is not None:
            map_state(lambda t, p: t[rows].copy_(p), self.state, part)
            return
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
    text: str = ""                     # "end": the reply's own text (a model with a text stream)
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
    text_ids: list[int] = field(default_factory=list)  # the reply's character per frame (text stream)
    discard: bool = False              # the turn was refused: drop its audio until the next turn


class Engine:
    """Batches the model work of every live session; thread-safe `post_*` methods feed it."""

    def __init__(self, bundle: ModelBundle, settings: GenerationSettings, max_sessions: int = 128,
                 batching: bool = True, threads: int = 1, seed: int = 0, ahead_ms: float = 0.0,
                 encode_hops: int = 1) -> None:
        if ahead_ms < 0 or encode_hops < 1:
            raise ValueError(f"ahead_ms {ahead_ms} must be >= 0 and encode_hops {encode_hops} >= 1")
        self.bundle, self.settings, self.batching, self.threads = bundle, settings, batching, threads
        self.ahead_s, self.encode_hops = ahead_ms / 1000.0, encode_hops
        self.codec, self.s2s = bundle.codec, bundle.s2s
        self.device = next(self.s2s.parameters()).device
        self.hop = self.codec.hop_length
        self.max_sessions = max_sessions
        config = self.s2s.config
        self.guided = settings.guidance != 1.0
        if self.guided and not config.guidable:
            raise ValueError(f"guidance {settings.guidance} needs a model trained with conditioning 'every_step' "
                             f"(this one: {config.conditioning!r}); set serving.guidance to 1.0")
        # With guidance, row r + max_sessions is row r's unconditioned twin (the same prompt and
        # tokens, the null speaker and emotion): live rows stay one contiguous slice in each half.
        self.cache = self.s2s.init_slots(2 * max_sessions if self.guided else max_sessions)
        self.hidden = torch.zeros(self.cache.rows, 1, config.d_model, device=self.device)
        self.owner: list[Conversation | None] = [None] * max_sessions
        self.delay = DelayState.empty(max_sessions, config.n_streams, self.device)  # aligned with KV rows
        self.stepper = DelayStepper(config, self.device)
        self.live = 0                              # rows 0..live-1 are replying
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
        # For /metrics: called with the seconds of each tick that did work (on the engine thread),
        # and the loop's last pass (monotonic), which a stalled engine stops advancing.
        self.tick_observer: Callable[[float], None] | None = None
        self.heartbeat = time.monotonic()
        self.frame_s = self.hop / bundle.sample_rate
        self.profile = TickProfile()
        self.next_due: float | None = None     # deadline scheduling: when a waiting reply next falls due

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
            waiting = self.encode_hops * self.hop  # less than a chunk waits for the end of utterance
            if self.commands.empty() and conversation is not None and len(conversation.pending) < waiting:
                return
            time.sleep(0.001)
        raise TimeoutError(f"conversation {conversation_id}: audio not encoded within {timeout} s")

    @property
    def replying(self) -> int:
        return self.live

    @property
    def queue_depth(self) -> int:
        """Commands posted by the sessions (audio, ends, opens...) that the engine has not taken yet."""
        return self.commands.qsize()

    @property
    def waiting_replies(self) -> int:
        """Conversations whose utterance ended and whose reply has not started yet."""
        for _ in range(3):  # read from another thread: the engine may add or drop one meanwhile
            try:
                return sum(1 for c in list(self.conversations.values()) if c.end_at is not None and c.row is None)
            except RuntimeError:
                continue
        return 0
    def describe(self) -> dict[str, Any]:
        """The engine's levers and its tick profile so far (cumulative: a caller takes differences)."""
        profile = self.profile
        return {"threads": self.threads, "ahead_ms": self.ahead_s * 1000, "encode_hops": self.encode_hops,
                "precision": self.bundle.meta.get("serving_precision", "fp32"), "ticks": profile.ticks,
                "tick_seconds": {**profile.seconds, "total": profile.total_s}}

    def _post(self, command: tuple) -> None:
        self.commands.put(command)
        self.wake.set()

    # --- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self.stopping:
                self.wake.clear()  # before the tick: a command posted during it sets it again
                started = self.heartbeat = time.monotonic()
                try:
                    worked = self.tick()
                except Exception as exc:  # a bug must not silently stall every session
                    log.exception("engine tick failed")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
                    worked = True
                if worked and self.tick_observer is not None:
                    self.tick_observer(time.monotonic() - started)
                if not worked:
                    idle = 0.05 if self.next_due is None else min(0.05, max(0.0, self.next_due - time.perf_counter()))
                    self.wake.wait(idle)

    def _fail_all(self, reason: str) -> None:
        """After an internal error: end every reply in flight with an error; sessions go on."""
        for row in range(self.live - 1, -1, -1):
            conversation = self.owner[row]
            self._free_row(row)
            if conversation is not None:
                conversation.emit(ReplyEvent("error", code="internal_error", message=f"reply failed: {reason}"))

    def tick(self) -> bool:
        """One round of work; returns whether there was any."""
        began = self.profile.clock()
        worked = self._apply_commands()
        worked |= self._encode()
        worked |= self._start_replies()
        self.next_due = None
        if self.live:
            groups = self._groups()
            finished: list[int] = []
            for rows in groups:
                finished += self._step(rows)
            for row in sorted(finished, reverse=True):
                self._free_row(row)
            worked |= bool(groups)
        self.ticks += worked
        if worked:
            self.profile.tick(self.profile.clock() - began)
        return worked

    def _groups(self) -> list[slice]:
        """The row slices to step this tick: every live row, or (deadline scheduling) the rows
        that are due; one slice per row without batching."""
        if not self.ahead_s:
            due = [True] * self.live
        else:
            now = time.perf_counter()
            margin = self.ahead_s + self.profile.last_tick_s  # a waiting row must last the next tick
            due = []
            for row in range(self.live):
                c = self.owner[row]
                if c is None or c.first_audio_at is None:
                    due.append(True)
                    continue
                played_until = c.first_audio_at + c.frames_out * self.frame_s  # the client's buffer runs dry then
                due.append(played_until - now <= margin)
                if not due[-1]:
                    at = played_until - margin
                    self.next_due = at if self.next_due is None else min(self.next_due, at)
        return due_slices(due, self.batching)

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
        try:
            check_utterance_length(conversation.samples_in, len(pcm), self.bundle.sample_rate, self.settings,
                                   drops_turn=True)
        except SessionError as exc:
            conversation.emit(ReplyEvent("error", code=exc.code, message=str(exc)))
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
        """Encode waiting user audio: per session up to `encode_hops` whole hops per round (at
        least that many while the utterance goes on), sessions with as many hops in one batch."""
        worked = False
        chunk = self.encode_hops * self.hop
        for _ in range(MAX_ENCODE_ROUNDS):
            groups: dict[int, list[Conversation]] = {}
            for c in self.conversations.values():
                if c.row is None and (len(c.pending) >= chunk or (c.end_at is not None and len(c.pending) >= self.hop)):
                    groups.setdefault(min(len(c.pending), chunk) // self.hop * self.hop, []).append(c)
            if not groups:
                break
            for size, ready in groups.items():
                self._encode_batch(ready, [c.pending[:size] for c in ready])
                for c in ready:
                    c.pending = c.pending[size:]
            worked = True
        return worked

    def _encode_batch(self, conversations: list[Conversation], hops: list[np.ndarray]) -> None:
        began = self.profile.clock()
        wav = torch.from_numpy(np.stack(hops))[:, None].to(self.device)
        index = torch.tensor([c.slot for c in conversations], device=self.device)
        codes, state = self.codec.encode_step(wav, self.encoder_states.gather(index))
        self.encoder_states.scatter(index, state)
        if codes.shape[-1]:
            for c, code in zip(conversations, codes.split(1)):
                c.codes.append(code)
        self.profile.add("encode", self.profile.clock() - began)

    def _start_replies(self) -> bool:
        worked = False
        for c in list(self.conversations.values()):
            if c.end_at is None or c.row is not None or len(c.pending) >= self.hop:
                continue
            if self.live >= self.max_sessions:
                break
            worked = True
            hop = last_hop(c.pending, self.hop)
            if hop is not None:
                self._encode_batch([c], [hop])
                c.pending = c.pending[:0]
            try:
                prompt = turn_prompt(c.codes, self.settings, self.codec.frame_rate, self.s2s.config)
            except SessionError as exc:
                c.emit(ReplyEvent("error", code=exc.code, message=str(exc)))
                self._reset_turn(c)
                continue
            self._prefill(c, prompt)
        return worked

    def _prefill(self, c: Conversation, prompt: Prompt) -> None:
        row = self.live
        self.live += 1
        self.owner[row], c.row = c, row
        speaker = torch.tensor([c.speaker_id], device=self.device)
        emotion = torch.tensor([c.emotion_id], device=self.device)
        self.hidden[row] = self.s2s.prefill_row(self.cache, row, prompt.user, speaker, emotion)[0]
        if self.guided:
            twin, config = row + self.max_sessions, self.s2s.config
            self.hidden[twin] = self.s2s.prefill_row(self.cache, twin, prompt.user, torch.full_like(speaker, config.null_speaker),
                                                     torch.full_like(emotion, config.null_emotion))[0]
        self.delay.begin(row, prompt.min_frames, prompt.reply_frames)
        self.decoder_states.reset(row)
        c.first_audio_at, c.frames_out, c.text_ids = None, 0, []

    def _step(self, rows: slice) -> list[int]:
        """One generation step for `rows` (models.delay_step): sample, emit completed frames,
        advance; returns the rows whose reply ended."""
        self.batch_sizes.append(rows.stop - rows.start)
        began = self.profile.clock()
        logits = self.s2s.logits(self.hidden[rows])
        twins = slice(rows.start + self.max_sessions, rows.stop + self.max_sessions)
        if self.guided:
            free = self.s2s.logits(self.hidden[twins])
            logits = free + self.settings.guidance * (logits - free)
        out = self.stepper.step(self.delay.rows(rows), logits, self.settings.temperature, self.settings.top_k,
                                self.generator)
        emitting = torch.nonzero(out.emitted).flatten()
        decoding = 0.0
        if len(emitting):
            if out.text is not None:
                for i, text_id in zip(emitting.tolist(), out.text[emitting].tolist()):
                    self.owner[rows.start + i].text_ids.append(text_id)
            decoding = self._decode([rows.start + i for i in emitting.tolist()], out.frames[emitting][:, :, None])
        self.hidden[rows] = self.s2s.step_rows(self.cache, rows, out.tokens[:, :, None])
        if self.guided:
            self.hidden[twins] = self.s2s.step_rows(self.cache, twins, out.tokens[:, :, None])
        self.profile.add("step", self.profile.clock() - began - decoding)
        return [rows.start + i for i in torch.nonzero(out.ended).flatten().tolist()]

    def _decode(self, rows: list[int], codes: torch.Tensor) -> float:
        """One codec decoder step for these rows' completed frames (e, K, 1), sent to their sessions;
        returns the seconds it took (on the profile's clock)."""
        began = self.profile.clock()
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
        elapsed = self.profile.clock() - began
        self.profile.add("decode", elapsed)
        return elapsed

    def _free_row(self, row: int) -> None:
        """End the reply in `row` (its metrics go out) and move the last live row into it."""
        c = self.owner[row]
        if c is not None:
            if c.end_at is not None and c.first_audio_at is not None:
                seconds = c.frames_out * self.hop / self.bundle.sample_rate
                c.emit(ReplyEvent("end", metrics={
                    "first_audio_ms": (c.first_audio_at - c.end_at) * 1000,
                    "reply_seconds": seconds, "frames": c.frames_out,
                    "reply_realtime_factor": seconds / max(time.perf_counter() - c.end_at, 1e-9)},
                    text=self.s2s.config.spoken_text(c.text_ids)))
            c.row = None
            self._reset_turn(c)
        last = self.live - 1
        if row != last:
            self.cache.move_row(last, row)
            if self.guided:
                self.cache.move_row(last + self.max_sessions, row + self.max_sessions)
                self.hidden[row + self.max_sessions] = self.hidden[last + self.max_sessions]
            self.decoder_states.move(last, row)
            self.delay.move_row(last, row)
            self.hidden[row] = self.hidden[last]
            moved = self.owner[last]
            self.owner[row] = moved
            if moved is not None:
                moved.row = row
        self.owner[last] = None
        self.live -= 1


__all__ = ["Engine", "ReplyEvent", "RowStates", "SessionError", "as_slice", "map_state"]
