"""The S2S transformer: a decoder-only transformer over codec tokens that hears a user's turn and
speaks the reply, in a chosen voice (speaker id) and manner (emotion id).

Codec codes come as (K, T) ints in [0, codebook_size): K residual-VQ codebooks, one frame per 20 ms.
The codebooks are laid out with MusicGen's *delay pattern*: codebook k is shifted right by k steps,
so one transformer step per frame predicts all K codebooks at once with K output heads, and the
input of a step is the sum of its K codebook embeddings. Codebook k of frame t is then predicted
after codebooks 0..k-1 of that frame were seen, which keeps most of the coarse-to-fine dependency of
residual VQ. Why this pattern:
  - flattening (K steps per frame) would multiply the per-frame latency and the KV cache by K;
  - a depth transformer (Moshi's) models the within-frame dependency exactly, but is a second model
    to train, cache and stream; at our scale the delay pattern is the simpler fit.
The price is K-1 steps of extra latency: a frame is complete K-1 steps after its first codebook.

Text stream (`text_stream`, Moshi's "inner monologue"): one more stream in front of the codebooks,
per frame the character the reply is speaking (ids of the aligner's vocabulary, `text_symbols`)
or TEXT_PAD (0, no character starts or lasts here), from a CTC forced alignment of the transcript
(tasks/training/align_corpus.py). It is at delay 0 and the codebooks one step later, so each
frame's character is predicted before its audio, which then follows what the model "says". It
has its own embedding and head; the user turn's text is TEXT_PAD (not known at inference). The
streams are then S = K + 1, stream 0 the text; without it S = K, as in models before 2026-12.

Per codebook the vocabulary is the codebook_size codes plus three special tokens (S2SConfig):
  PAD = codebook_size      fills the gaps of the delay pattern and pads batches; never a target
  BOS = codebook_size + 1  one column between the user's turn and the reply: "speak now"
  EOS = codebook_size + 2  a whole frame after the reply's last frame, delayed like any frame
The text stream's ids are 0 (TEXT_PAD), 1..len(text_symbols) the characters, and TEXT_NONE =
len(text_symbols) + 1, its PAD: outside the reply, never a target.

A sequence (one row per stream) is
  [conditioning slot] [user frames, delayed] [BOS] [reply frames + EOS frame, delayed]
The conditioning slot is an ordinary position (its token is a PAD placeholder) whose embedding is
replaced by speaker + emotion embeddings: tokens, logits and targets then share one index, and the
KV cache needs no special case for the conditioning. With conditioning "every_step" the same
embedding is also added to every position, so the voice controls reach every reply step instead
of fading behind a long user turn; trained with conditioning dropout (a null speaker and emotion),
it also allows classifier-free guidance. The loss covers only the reply (codes and
EOS); everything else is PAD in the targets and skipped by cross-entropy's ignore_index.

Streaming (after moshi): generation keeps its state in an explicit KVCache (per-layer keys and
values plus the number of positions written), feeds one step at a time, and yields every frame as
soon as its last codebook is sampled. Positions are rotary, so a cached step only needs its index.

Over 400 lines: the model, its KV cache, the delay pattern and generation belong together
(generation steps the same layers with the same cache the training forward uses).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

from models.delay_step import TEXT_PAD, DelayState, DelayStepper

ABSENT_LOGIT = -1e4  # the logit of an id a stream's vocabulary does not have (see S2STransformer._heads)

try:  # an optional GPU kernel: the CPU path (torch SDPA) never needs it
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


@dataclass
class S2SConfig:
    n_codebooks: int = 4
    codebook_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 1024  # positions: conditioning + user turn + BOS + reply, all delayed
    dropout: float = 0.0            # on embeddings and residual branches
    attention_dropout: float = 0.0  # on attention weights: on the CPU it sends SDPA down its slow
                                    # math path (1.8x a smoke training step), so only where it pays
    n_speakers: int = 4  # core.labels.SPEAKERS
    n_emotions: int = 9  # core.labels.EMOTIONS
    conditioning: str = "slot"  # "slot": speaker + emotion at position 0 only (models before 2026-11-30);
                                # "every_step": added to every position, with a null id for guidance
    text_stream: bool = False   # the reply's characters as stream 0 (models before 2026-12: none)
    text_symbols: str = ""      # the text stream's characters, id i + 1 for text_symbols[i]

    def __post_init__(self) -> None:
        if self.conditioning not in ("slot", "every_step"):
            raise ValueError(f"conditioning must be 'slot' or 'every_step', got {self.conditioning!r}")
        if self.text_stream and not self.text_symbols:
            raise ValueError("a text stream needs its characters (text_symbols, from the aligner's vocabulary)")

    @property
    def guidable(self) -> bool:
        """Trained with a null condition (conditioning dropout), so classifier-free guidance works."""
        return self.conditioning == "every_step"

    @property
    def null_speaker(self) -> int:
        """The "no speaker asked for" id (every_step only): conditioning dropout and guidance."""
        return self.n_speakers

    @property
    def null_emotion(self) -> int:
        return self.n_emotions

    @property
    def pad_id(self) -> int:
        return self.codebook_size

    @property
    def bos_id(self) -> int:
        return self.codebook_size + 1

    @property
    def eos_id(self) -> int:
        return self.codebook_size + 2

    @property
    def vocab_size(self) -> int:
        """Tokens per codebook: the codes and the three special tokens."""
        return self.codebook_size + 3

    @property
    def n_streams(self) -> int:
        """Rows of a sequence: the codebooks, and the text in front of them when there is one."""
        return self.n_codebooks + int(self.text_stream)

    @property
    def text_vocab_size(self) -> int:
        """Ids the text head predicts: TEXT_PAD and the characters."""
        return len(self.text_symbols) + 1

    @property
    def text_none_id(self) -> int:
        return self.text_vocab_size

    @property
    def stream_pads(self) -> list[int]:
        """Each stream's PAD: gaps, padding and every position that is not a target."""
        return [self.text_none_id] * int(self.text_stream) + [self.pad_id] * self.n_codebooks

    @property
    def logit_width(self) -> int:
        """Logits of all streams share one tensor, as wide as the widest vocabulary."""
        return max(self.vocab_size, self.text_vocab_size) if self.text_stream else self.vocab_size

    def spoken_text(self, ids: Sequence[int]) -> str:
        """The text of a reply's per-frame character ids, CTC-collapsed: a character held over
        several frames counts once, TEXT_PAD separates (so a doubled letter keeps both)."""
        kept = [i for n, i in enumerate(ids) if i != TEXT_PAD and (n == 0 or ids[n - 1] != i)]
        return "".join(self.text_symbols[i - 1] for i in kept if 0 < i <= len(self.text_symbols))

    def sequence_length(self, user_frames: int, reply_frames: int) -> int:
        """Positions a pair takes (training inputs, or generation at most): 1 + (Tu + S - 1) + 1 +
        (Tr + 1 + S - 1) tokens, less the last one, which is only ever a target."""
        return user_frames + reply_frames + 2 * self.n_streams


# ---------------------------------------------------------------------------------------------
# Delay pattern, training examples, batches


def delay(codes: Tensor, pad: int | Sequence[int]) -> Tensor:
    """(..., K, T) -> (..., K, T + K - 1): row k shifted right by k steps, gaps set to `pad` (one
    value, or one per row)."""
    n_codebooks, frames = codes.shape[-2:]
    pads = [pad] * n_codebooks if isinstance(pad, int) else list(pad)
    out = codes.new_empty((*codes.shape[:-1], frames + n_codebooks - 1))
    for k in range(n_codebooks):
        out[..., k, :] = pads[k]
        out[..., k, k : k + frames] = codes[..., k, :]
    return out


def undelay(delayed: Tensor) -> Tensor:
    """(..., K, T + K - 1) -> (..., K, T): the inverse of `delay`."""
    n_codebooks, steps = delayed.shape[-2:]
    frames = steps - n_codebooks + 1
    return torch.stack([delayed[..., k, k : k + frames] for k in range(n_codebooks)], dim=-2)


def with_text(codes: Tensor, text: Tensor | int, config: S2SConfig) -> Tensor:
    """(..., K, T) codes as the model's (..., S, T) streams: the text row `text` ((..., T) ids or
    one id) in front when the model has a text stream, the codes alone otherwise."""
    if not config.text_stream:
        return codes
    row = codes.new_full((*codes.shape[:-2], 1, codes.shape[-1]), 0)
    row[..., 0, :] = text
    return torch.cat([row, codes], dim=-2)


def prompt_tokens(user_codes: Tensor, config: S2SConfig) -> Tensor:
    """The prompt (B, S, 1 + Tu + S - 1 + 1) of a reply to user codes (B, K, Tu): the conditioning
    slot, the user's turn delayed (its text TEXT_PAD), and BOS (text: TEXT_NONE)."""
    pads = torch.tensor(config.stream_pads, device=user_codes.device)
    column = pads[None, :, None].expand(user_codes.shape[0], -1, 1)
    bos = column.clone()
    bos[:, int(config.text_stream):] = config.bos_id
    return torch.cat([column, delay(with_text(user_codes.long(), TEXT_PAD, config), config.stream_pads), bos], dim=2)


def build_training_example(
    user_codes: Tensor, reply_codes: Tensor, config: S2SConfig, reply_text: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One (user turn, reply) pair as next-token inputs (S, L), targets (S, L) and loss mask (S, L).

    Targets are the sequence shifted left by one, with every position outside the reply set to its
    stream's PAD, so cross-entropy ignoring those trains only the reply (its codes, its characters
    and its EOS frame); the mask says the same thing for whoever wants to count tokens. With a
    text stream, `reply_text` (Tr,) holds the reply's character per frame; None (a segment without
    a transcript) trains no text: its input is TEXT_PAD, its targets are ignored."""
    for name, codes in (("user_codes", user_codes), ("reply_codes", reply_codes)):
        if codes.dim() != 2:
            raise ValueError(f"{name} must be (n_codebooks, frames), got shape {tuple(codes.shape)}")
        _check_codes(name, codes, config)
    user_frames, reply_frames = user_codes.shape[1], reply_codes.shape[1]
    if reply_text is not None and reply_text.shape != (reply_frames,):
        raise ValueError(f"reply_text must be ({reply_frames},), one id per reply frame, got {tuple(reply_text.shape)}")
    length = config.sequence_length(user_frames, reply_frames)
    if length > config.max_len:
        raise ValueError(f"pair needs {length} positions, more than max_len={config.max_len}")
    n_streams, pads = config.n_streams, config.stream_pads
    eos_column = reply_codes.new_full((config.n_codebooks, 1), config.eos_id)
    text = TEXT_PAD if reply_text is None else torch.cat([reply_text.long(), reply_text.new_zeros(1)])
    reply = delay(with_text(torch.cat([reply_codes.long(), eos_column], dim=1), text, config), pads)
    sequence = torch.cat([prompt_tokens(user_codes[None], config)[0], reply], dim=1)
    inputs, targets = sequence[:, :-1], sequence[:, 1:].clone()
    ignore = torch.tensor(pads)[:, None]
    targets[:, : user_frames + n_streams] = ignore  # target j is token j + 1: the reply starts after BOS
    if config.text_stream and reply_text is None:
        targets[0] = config.text_none_id
    return inputs, targets, targets != ignore


def collate_examples(
    examples: Sequence[tuple[Tensor, Tensor, Tensor]], config: S2SConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Examples of `build_training_example` as (B, S, L) inputs, targets and mask, right-padded with
    each stream's PAD. Right padding needs no attention mask: attention is causal, so no real
    position sees a pad, and the pads' targets are PAD, which the loss ignores."""
    length = max(inputs.shape[1] for inputs, _, _ in examples)
    shape = (len(examples), config.n_streams, length)
    pads = torch.tensor(config.stream_pads)[None, :, None].expand(shape)
    inputs, targets = pads.clone(), pads.clone()
    mask = torch.zeros(shape, dtype=torch.bool)
    for i, (x, y, m) in enumerate(examples):
        inputs[i, :, : x.shape[1]], targets[i, :, : y.shape[1]], mask[i, :, : m.shape[1]] = x, y, m
    return inputs, targets, mask


# ---------------------------------------------------------------------------------------------
# Validation: clear errors here rather than an index error deep in an embedding (or a CUDA assert)


def _check_codes(name: str, codes: Tensor, config: S2SConfig, upper: int | None = None) -> None:
    """Codes of shape (..., K, T), integers in [0, upper) (the codebook size by default)."""
    upper = config.codebook_size if upper is None else upper
    if codes.dim() < 2 or codes.shape[-2] != config.n_codebooks:
        raise ValueError(
            f"{name} must have {config.n_codebooks} codebooks in dim -2, got shape {tuple(codes.shape)}"
        )
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"{name} must be integer codes, got {codes.dtype}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= upper):
        raise ValueError(f"{name} must lie in [0, {upper}), got values {codes.min().item()}..{codes.max().item()}")


def _check_tokens(tokens: Tensor, config: S2SConfig) -> None:
    """Model inputs (B, S, L): audio streams in [0, vocab_size), the text stream in [0, TEXT_NONE]."""
    if tokens.dim() != 3 or tokens.shape[1] != config.n_streams:
        raise ValueError(f"tokens must be (batch, {config.n_streams} streams, length), got shape {tuple(tokens.shape)}")
    first = int(config.text_stream)
    _check_codes("tokens", tokens[:, first:], config, upper=config.vocab_size)
    text = tokens[:, 0]
    if first and text.numel() and (text.min() < 0 or text.max() > config.text_none_id):
        raise ValueError(f"text tokens must lie in [0, {config.text_none_id}], got {text.min().item()}..{text.max().item()}")


def _check_ids(name: str, ids: Tensor, count: int, batch: int) -> None:
    if ids.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{name} ids must be integers, got {ids.dtype}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= count):
        bad = ids[(ids < 0) | (ids >= count)][0].item()
        raise ValueError(f"{name} id {bad} is out of range: there are {count} ({name} ids 0..{count - 1})")


# ---------------------------------------------------------------------------------------------
# The model


def rotary_tables(head_dim: int, max_len: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables (max_len, head_dim / 2) of rotary position embeddings."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, L, D) queries or keys by their positions' angles (cos, sin: (L, D / 2))."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attend(q: Tensor, k: Tensor, v: Tensor, start: int, dropout_p: float) -> Tensor:
    """Causal attention of L new queries at positions start.. over all start + L keys, (B, H, ., D).

    flash-attn when it is installed and the tensors suit it (CUDA, half precision); its causal mask
    is aligned bottom-right, as a cache needs. SDPA otherwise: its `is_causal` mask is aligned
    top-left, right only without a cached prefix, so a chunk after a prefix gets an explicit mask."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal=True)
        return out.transpose(1, 2)
    length = q.shape[2]
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if length == 1:  # one new query sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    mask = torch.ones(length, start + length, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


@dataclass
class ReplyFrame:
    """One frame of a reply as generation yields it."""

    codes: Tensor        # (B, K, 1) audio codes
    text: Tensor | None  # (B,) the character id spoken in the frame (TEXT_PAD: none); None without a text stream


@dataclass
class KVCache:
    """Streaming state of one batch of sequences: per layer, keys and values (B, H, capacity, D) of
    the positions seen so far, and how many that is. Every sequence of the batch is at the same
    position. `forward` appends to it in place."""

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


@dataclass
class SlotCache:
    """Streaming state of many independent sequences (rows), each at its own position: what lets
    a server step every live conversation in one batch. Rows 0..n-1 are the live ones; a row that
    ends is refilled by moving the last live row into it (`move_row`), so a batch is always a
    contiguous slice and the keys are read in place, never gathered."""

    keys: list[Tensor]    # per layer (rows, H, capacity, D)
    values: list[Tensor]
    lengths: Tensor       # (rows,) positions filled in each row
    condition: Tensor     # (rows, d_model) speaker + emotion embedding of each row's reply

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def row_view(self, row: int) -> KVCache:
        """Row `row` as a one-sequence KVCache writing into this cache (for a prefill)."""
        return KVCache([k[row: row + 1] for k in self.keys], [v[row: row + 1] for v in self.values],
                       int(self.lengths[row]))

    def move_row(self, src: int, dst: int) -> None:
        if src != dst:
            length = int(self.lengths[src]) or 1
            for k, v in zip(self.keys, self.values):
                k[dst, :, :length] = k[src, :, :length]
                v[dst, :, :length] = v[src, :, :length]
            self.lengths[dst] = self.lengths[src]
            self.condition[dst] = self.condition[src]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: S2SConfig) -> None:
        super().__init__()
        self.n_heads, self.dropout = config.n_heads, config.attention_dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        batch, length, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + length] = k
            cache.values[layer][:, :, start : start + length] = v
            k = cache.keys[layer][:, :, : start + length]
            v = cache.values[layer][:, :, : start + length]
        y = attend(q, k, v, start, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, d_model))


    def step_rows(self, x: Tensor, cos: Tensor, sin: Tensor, cache: SlotCache, layer: int, rows: slice,
                  positions: Tensor, mask: Tensor) -> Tensor:
        """One new token for each row of `rows` (each at its own position): x (n, 1, d_model)."""
        batch = x.shape[0]
        q, k, v = self.qkv(x).view(batch, 1, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        index = torch.arange(rows.start, rows.stop, device=x.device)
        cache.keys[layer][index, :, positions] = k[:, :, 0].to(cache.keys[layer].dtype)
        cache.values[layer][index, :, positions] = v[:, :, 0].to(cache.values[layer].dtype)
        span = mask.shape[-1]
        keys, values = cache.keys[layer][rows, :, :span], cache.values[layer][rows, :, :span]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(batch, 1, -1))


class MLP(nn.Module):
    def __init__(self, config: S2SConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model, bias=False)
        self.down = nn.Linear(4 * config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: S2SConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(config.d_model), nn.RMSNorm(config.d_model)
        self.attn, self.mlp = CausalSelfAttention(config), MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, cache, layer))
        return x + self.drop(self.mlp(self.norm2(x)))

    def step_rows(self, x: Tensor, cos: Tensor, sin: Tensor, cache: SlotCache, layer: int, rows: slice,
                  positions: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn.step_rows(self.norm1(x), cos, sin, cache, layer, rows, positions, mask)
        return x + self.mlp(self.norm2(x))


class S2STransformer(nn.Module):
    def __init__(self, config: S2SConfig) -> None:
        super().__init__()
        if config.d_model % config.n_heads or (config.d_model // config.n_heads) % 2:
            raise ValueError(f"d_model={config.d_model} must split into {config.n_heads} heads of even size")
        self.config = config
        self.embeddings = nn.ModuleList(
            nn.Embedding(config.vocab_size, config.d_model) for _ in range(config.n_codebooks)
        )
        null = 1 if config.guidable else 0  # one more row: the null condition
        self.speaker_embedding = nn.Embedding(config.n_speakers + null, config.d_model)
        self.emotion_embedding = nn.Embedding(config.n_emotions + null, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)
        self.heads = nn.ModuleList(
            nn.Linear(config.d_model, config.vocab_size, bias=False) for _ in range(config.n_codebooks)
        )
        if config.text_stream:  # TEXT_NONE is an input only: the head predicts TEXT_PAD and characters
            self.text_embedding = nn.Embedding(config.text_vocab_size + 1, config.d_model)
            self.text_head = nn.Linear(config.d_model, config.text_vocab_size, bias=False)
        cos, sin = rotary_tables(config.d_model // config.n_heads, config.max_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Small weights: near-zero logits, so an untrained model is close to uniform."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` positions (config.max_len by
        default), on the model's device. Its dtype is that of the keys to come unless told: the
        autocast dtype when autocast is on, else the weights'."""
        capacity = self.config.max_len if max_len is None else max_len
        if not 0 < capacity <= self.config.max_len:
            raise ValueError(f"cache max_len must be in 1..{self.config.max_len}, got {capacity}")
        weight = self.heads[0].weight
        if dtype is None:
            autocast = torch.is_autocast_enabled(weight.device.type)
            dtype = torch.get_autocast_dtype(weight.device.type) if autocast else weight.dtype
        shape = (batch, self.config.n_heads, capacity, self.config.d_model // self.config.n_heads)
        keys, values = ([torch.zeros(shape, dtype=dtype, device=weight.device) for _ in self.blocks] for _ in range(2))
        return KVCache(keys, values)

    def init_slots(self, rows: int, capacity: int | None = None) -> SlotCache:
        """An empty SlotCache for up to `rows` concurrent sequences (see SlotCache)."""
        one = self.init_cache(rows, capacity)
        device = one.keys[0].device
        return SlotCache(one.keys, one.values, torch.zeros(rows, dtype=torch.long, device=device),
                         torch.zeros(rows, self.config.d_model, dtype=one.keys[0].dtype, device=device))

    def prefill_row(self, cache: SlotCache, row: int, user_codes: Tensor, speaker: Tensor, emotion: Tensor) -> Tensor:
        """Start a reply in row `row`: the prompt (conditioning, delayed user turn, BOS) goes into
        the row's cache; returns the last hidden state (1, 1, d_model), the input of the first step."""
        _check_codes("user_codes", user_codes, self.config)
        self._check_conditioning(speaker, emotion, 1)
        prompt = prompt_tokens(user_codes, self.config)
        view = cache.row_view(row)
        view.length = 0
        hidden = self._hidden(prompt, speaker, emotion, view)[:, -1:]
        cache.lengths[row] = view.length
        cache.condition[row] = self.condition(speaker, emotion)[0].to(cache.condition.dtype)
        return hidden

    def step_rows(self, cache: SlotCache, rows: slice, tokens: Tensor) -> Tensor:
        """Append one column of tokens (n, S, 1) to each row of `rows`, each at its own position;
        returns the new hidden states (n, 1, d_model). Equals `forward` with a KVCache per row."""
        positions = cache.lengths[rows]
        if int(positions.max()) >= cache.capacity:
            raise ValueError(f"a row reached the cache capacity of {cache.capacity} positions")
        x = self._embed(tokens)
        if self.config.conditioning == "every_step":
            x = x + cache.condition[rows][:, None].to(x.dtype)
        cos, sin = self.rope_cos[positions][:, None, None], self.rope_sin[positions][:, None, None]
        span = int(positions.max()) + 1
        mask = (torch.arange(span, device=x.device)[None] <= positions[:, None])[:, None, None]
        for layer, block in enumerate(self.blocks):
            x = block.step_rows(x, cos, sin, cache, layer, rows, positions, mask)
        cache.lengths[rows] += 1
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits (B, S, W) from the last hidden state (B, 1, d_model)."""
        return self._heads(hidden)[:, :, -1]

    def forward(self, tokens: Tensor, speaker: Tensor, emotion: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits (B, S, L, W) of the next token for each of the L positions of `tokens` (B, S, L).

        Without a cache, `tokens` is a whole sequence from position 0 (its first column is the
        conditioning slot). With one, they are the next positions after those already in the cache,
        which they are appended to. speaker and emotion (B,) are used at position 0 only."""
        _check_tokens(tokens, self.config)
        self._check_conditioning(speaker, emotion, tokens.shape[0])
        if cache is not None and cache.keys[0].shape[0] != tokens.shape[0]:
            raise ValueError(f"cache holds {cache.keys[0].shape[0]} sequences, tokens {tokens.shape[0]}")
        return self._heads(self._hidden(tokens, speaker, emotion, cache))

    def stream_losses(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Summed cross-entropy (S,) and number of targets (S,) per stream, each stream's PAD ignored."""
        pads = torch.tensor(self.config.stream_pads, device=targets.device)[None, :, None]
        targets = targets.masked_fill(targets == pads, -100)
        ce = F.cross_entropy(logits.flatten(0, 2).float(), targets.flatten(), reduction="none")
        return ce.view(targets.shape).sum((0, 2)), (targets != -100).sum((0, 2))

    def loss(self, logits: Tensor, targets: Tensor, weights: Sequence[float] | None = None) -> Tensor:
        """Mean cross-entropy over the non-PAD targets (B, S, L), each stream's tokens weighted by
        `weights` (S,) (equal by default: then its exp is the perplexity)."""
        sums, counts = self.stream_losses(logits, targets)
        if weights is None:
            return sums.sum() / counts.sum().clamp_min(1)
        w = torch.tensor(weights, dtype=sums.dtype, device=sums.device)
        return (w * sums).sum() / (w * counts).sum().clamp_min(1)

    def _check_conditioning(self, speaker: Tensor, emotion: Tensor, batch: int) -> None:
        """Ids of the model's speakers and emotions; a guidable model also takes the null ids."""
        null = 1 if self.config.guidable else 0
        _check_ids("speaker", speaker, self.config.n_speakers + null, batch)
        _check_ids("emotion", emotion, self.config.n_emotions + null, batch)

    def condition(self, speaker: Tensor, emotion: Tensor) -> Tensor:
        """(B, d_model): what a reply is conditioned on."""
        return self.speaker_embedding(speaker) + self.emotion_embedding(emotion)

    def _hidden(self, tokens: Tensor, speaker: Tensor, emotion: Tensor, cache: KVCache | None) -> Tensor:
        """Final hidden states (B, L, d_model); appends to the cache and advances it."""
        length = tokens.shape[2]
        start = 0 if cache is None else cache.length
        limit = self.config.max_len if cache is None else cache.capacity
        if start + length > limit:
            raise ValueError(f"positions {start}..{start + length - 1} exceed the {limit} available")
        x = self._embed(tokens)
        condition = self.condition(speaker, emotion)
        if self.config.conditioning == "every_step":  # every position hears the voice it speaks in
            x = x + condition[:, None]
        if start == 0:  # the conditioning slot
            x = torch.cat([condition[:, None], x[:, 1:]], dim=1)
        x = self.drop(x)
        cos, sin = self.rope_cos[start : start + length], self.rope_sin[start : start + length]
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer)
        if cache is not None:
            cache.length += length
        return self.norm(x)

    def _embed(self, tokens: Tensor) -> Tensor:
        """(B, S, L) tokens -> (B, L, d_model): the sum of their streams' embeddings."""
        first = int(self.config.text_stream)
        x = sum(embedding(tokens[:, first + k]) for k, embedding in enumerate(self.embeddings))
        return x + self.text_embedding(tokens[:, 0]) if first else x

    def _heads(self, hidden: Tensor) -> Tensor:
        """(B, L, d_model) -> (B, S, L, W) logits. A stream's ids beyond its vocabulary get ABSENT_LOGIT:
        finite, so guidance's difference of two logits stays a number; never sampled, never a target."""
        audio = torch.stack([head(hidden) for head in self.heads], dim=1)
        if not self.config.text_stream:
            return audio
        width = self.config.logit_width
        text = F.pad(self.text_head(hidden)[:, None], (0, width - self.config.text_vocab_size), value=ABSENT_LOGIT)
        return torch.cat([text, F.pad(audio, (0, width - self.config.vocab_size), value=ABSENT_LOGIT)], dim=1)

    def generate(
        self,
        user_codes: Tensor,
        speaker: Tensor,
        emotion: Tensor,
        max_frames: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        min_frames: int = 0,
        guidance: float = 1.0,
    ) -> Iterator[Tensor]:
        """The audio of `reply_frames`: frames (B, K, 1) of codes as soon as each is complete."""
        for frame in self.reply_frames(user_codes, speaker, emotion, max_frames, temperature, top_k, generator,
                                       min_frames, guidance):
            yield frame.codes

    @torch.inference_mode()
    def reply_frames(
        self,
        user_codes: Tensor,
        speaker: Tensor,
        emotion: Tensor,
        max_frames: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        min_frames: int = 0,
        guidance: float = 1.0,
    ) -> Iterator[ReplyFrame]:
        """Speak the reply to `user_codes` (B, K, Tu): yields each frame (codes (B, K, 1), and
        with a text stream the character ids (B,) said in it) as soon as it is complete, until
        every sequence has ended (EOS) or `max_frames` were yielded.

        A sequence that has ended gets PAD (= codebook_size) in the frames the others still yield
        (and TEXT_PAD as its text). temperature=0 or top_k=1 is greedy. EOS is not sampled before
        `min_frames` frames (a reply is never empty when min_frames >= 1). Codebook 0 may sample
        codes or EOS, the others codes only: their delay gaps and their EOS follow from codebook
        0's (models.delay_step, the rule the serving engine steps its rows with too). guidance > 1
        is classifier-free guidance (a guidable model only): logits = unconditioned + guidance x
        (conditioned - unconditioned), from a second pass with the null speaker and emotion, so
        the reply follows the voice controls more closely at twice the compute. Dropout is active
        in training mode, so call model.eval() first."""
        config = self.config
        if user_codes.dim() != 3:
            raise ValueError(
                f"user_codes must be (batch, n_codebooks, frames), got shape {tuple(user_codes.shape)}"
            )
        _check_codes("user_codes", user_codes, config)
        batch, _, user_frames = user_codes.shape
        self._check_conditioning(speaker, emotion, batch)
        if max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need temperature >= 0 and top_k >= 1, got {temperature} and {top_k}")
        guided = guidance != 1.0
        if guided and not config.guidable:
            raise ValueError(f"guidance {guidance} needs a model trained with conditioning 'every_step' "
                             f"(this one: {config.conditioning!r})")
        positions = config.sequence_length(user_frames, max_frames)
        if positions > config.max_len:
            room = config.max_len - config.sequence_length(user_frames, 0)
            raise ValueError(
                f"a user turn of {user_frames} frames with up to {max_frames} reply frames needs {positions} "
                f"positions, max_len is {config.max_len}: "
                + (f"at most {room} reply frames fit" if room > 0 else "the user turn is too long")
            )
        device = user_codes.device
        if guided:  # rows B.. are the same prompts without a condition
            speaker = torch.cat([speaker, torch.full_like(speaker, config.null_speaker)])
            emotion = torch.cat([emotion, torch.full_like(emotion, config.null_emotion)])
            user_codes = torch.cat([user_codes, user_codes])
        cache = self.init_cache(user_codes.shape[0], positions)
        hidden = self._hidden(prompt_tokens(user_codes, config), speaker, emotion, cache)[:, -1:]

        stepper = DelayStepper(config, device)
        state = DelayState.empty(batch, config.n_streams, device)
        state.begin(slice(None), min_frames, max_frames)
        for _ in range(max_frames + config.n_streams):  # a bound: every row has ended by then
            logits = self.logits(hidden)
            if guided:
                conditioned, free = logits[:batch], logits[batch:]
                logits = free + guidance * (conditioned - free)
            out = stepper.step(state, logits, temperature, top_k, generator)
            if out.emitted.any():
                codes = out.frames.masked_fill(~out.emitted[:, None], config.pad_id)[:, :, None]
                text = None if out.text is None else out.text.masked_fill(~out.emitted, TEXT_PAD)
                yield ReplyFrame(codes, text)
            if out.ended.all():
                return
            tokens = out.tokens[:, :, None]
            hidden = self._hidden(torch.cat([tokens, tokens]) if guided else tokens, speaker, emotion, cache)
