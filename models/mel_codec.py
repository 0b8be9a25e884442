"""TeluCodec v2: a fixed log-mel front end, a k-means residual VQ and a causal Vocos-style vocoder.

    wav (B, 1, T) -> causal log-mel (B, n_mels, T / hop) -> per-bin normalisation -> residual VQ
    codes -> normalised mel -> causal ConvNeXt blocks at the frame rate -> log-magnitude + phase
          -> inverse FFT per frame -> windowed overlap-add -> wav (B, 1, frames * hop)

Why this shape: the front end is DSP, so there is no encoder to collapse; the quantizer is fitted
by k-means on corpus frames (dead codes reseeded), so every code is used from the start; the
vocoder learns from its first step, and its work is matrix products at 50 frames/s instead of
convolutions at the sample rate. Everything is causal: frame t sees samples up to the end of its
hop, so streaming (`encode_step`, `decode_step`) gives the same numbers as `encode`/`decode`.
The price of causality is a fixed delay: the output lags the input by `delay_samples`
(overlap-add of `n_fft` windows), and scoring compares them at that lag.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from models.codec_shape import CodecShape
from models.config_checks import check_same_architecture, config_from_dict
from models.quantizer import ResidualVectorQuantizer
from models.streaming import CausalConv1d, ConvState

LOG_FLOOR = 1e-5     # mel power floor of the front end, before the corpus's own floor below
FLOOR_QUANTILE = 0.01  # per-bin level floor: the corpus's quietest 1 % of frames


@dataclass
class MelCodecConfig:
    """Everything that shapes a MelCodec; saved beside its weights so a checkpoint rebuilds it."""

    sample_rate: int = 16000
    hop_length: int = 320            # 50 frames/s
    mel_n_fft: int = 640             # analysis window (causal: it ends where its hop ends)
    n_mels: int = 80
    n_codebooks: int = 4
    codebook_size: int = 1024        # 50 x 4 x 10 bits = 2.0 kbps
    vocoder_n_fft: int = 640         # synthesis window: the delay is vocoder_n_fft - hop_length
    vocoder_dim: int = 256
    vocoder_layers: int = 6
    vocoder_kernel: int = 7
    quantizer_weighting: float = 0.0  # k-means distances in per-bin std^p units: 0 = the normalised
                                      # mel's z-scores, 1 = log-mel units (loud, varied bins count more)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MelCodecConfig:
        """Missing keys take their defaults; unknown keys are refused (a misspelt setting)."""
        return config_from_dict(cls, values, "mel codec")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FrameState:
    """Samples the next causal analysis frame still needs from before its hop."""

    past: Tensor  # (B, n_fft - hop)


@dataclass
class OverlapAddState:
    """The part of the frames synthesised so far that reaches past the samples already emitted."""

    tail: Tensor  # (B, n_fft - hop)


class CausalLogMel(nn.Module):
    """Log-mel frames whose window ends where their hop ends: no look-ahead, so it streams."""

    def __init__(self, cfg: MelCodecConfig) -> None:
        super().__init__()
        self.hop, self.n_fft = cfg.hop_length, cfg.mel_n_fft
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        fbank = torchaudio.functional.melscale_fbanks(self.n_fft // 2 + 1, 0.0, cfg.sample_rate / 2, cfg.n_mels,
                                                      cfg.sample_rate, norm="slaney", mel_scale="slaney")
        self.register_buffer("fbank", fbank, persistent=False)

    def frames(self, samples: Tensor) -> Tensor:
        """(B, n_fft - hop + F * hop) samples -> (B, n_mels, F) log-mel."""
        windows = samples.unfold(-1, self.n_fft, self.hop) * self.window           # (B, F, n_fft)
        power = torch.fft.rfft(windows.float(), dim=-1).abs().pow(2)
        return torch.log((power @ self.fbank).clamp_min(LOG_FLOOR)).transpose(1, 2)

    def forward(self, wav: Tensor) -> Tensor:
        """(B, 1, T), T a multiple of hop -> (B, n_mels, T / hop); silence before the start."""
        return self.frames(F.pad(wav[:, 0], (self.n_fft - self.hop, 0)))

    def init_state(self, batch: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> FrameState:
        return FrameState(torch.zeros(batch, self.n_fft - self.hop, device=device, dtype=dtype))

    def step(self, wav: Tensor, state: FrameState) -> tuple[Tensor, FrameState]:
        """Chunks of whole hops in, their frames out; the same numbers as `forward`."""
        samples = torch.cat([state.past, wav[:, 0]], dim=-1)
        return self.frames(samples), FrameState(samples[:, samples.shape[-1] - (self.n_fft - self.hop):])


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv over frames, then a per-frame MLP, as a scaled residual (Vocos)."""

    def __init__(self, dim: int, kernel: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))
        self.scale = nn.Parameter(torch.full((dim,), layer_scale))

    def _rest(self, x: Tensor, y: Tensor) -> Tensor:
        return x + (self.scale * self.mlp(self.norm(y.transpose(1, 2)))).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self._rest(x, self.dwconv(x))

    def init_state(self, batch: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> ConvState:
        return self.dwconv.init_state(batch, device, dtype)

    def step(self, x: Tensor, state: ConvState) -> tuple[Tensor, ConvState]:
        y, state = self.dwconv.step(x, state)
        return self._rest(x, y), state


class CausalVocoder(nn.Module):
    """Normalised mel frames -> waveform, one hop per frame, through an inverse STFT head.

    The head predicts a log-magnitude and a phase per FFT bin; each frame's inverse FFT is
    windowed and overlap-added, and the sum is divided by the (periodic) window envelope.
    Frame t's window ends where its mel frame's window ends, so nothing looks ahead; the output
    sample s stands for input sample s - (n_fft - hop).
    """

    def __init__(self, cfg: MelCodecConfig) -> None:
        super().__init__()
        self.hop, self.n_fft = cfg.hop_length, cfg.vocoder_n_fft
        if self.n_fft < self.hop:
            raise ValueError(f"vocoder_n_fft {self.n_fft} is shorter than the hop {self.hop}")
        self.embed = CausalConv1d(cfg.n_mels, cfg.vocoder_dim, cfg.vocoder_kernel)
        self.norm = nn.LayerNorm(cfg.vocoder_dim)
        self.blocks = nn.ModuleList(ConvNeXtBlock(cfg.vocoder_dim, cfg.vocoder_kernel, 1.0 / cfg.vocoder_layers)
                                    for _ in range(cfg.vocoder_layers))
        self.final_norm = nn.LayerNorm(cfg.vocoder_dim)
        self.head = nn.Linear(cfg.vocoder_dim, self.n_fft + 2)
        window = torch.hann_window(self.n_fft)
        self.register_buffer("window", window, persistent=False)
        envelope = torch.zeros(self.hop)
        for offset in range(0, self.n_fft, self.hop):      # steady-state sum of overlapping windows
            piece = window[offset: offset + self.hop]
            envelope[: len(piece)] += piece
        self.register_buffer("envelope", envelope, persistent=False)

    def _frames(self, h: Tensor) -> Tensor:
        """(B, dim, F) features -> (B, F, n_fft) windowed time-domain frames."""
        x = self.head(self.final_norm(h.transpose(1, 2)))
        log_mag, phase = x.float().split([self.n_fft // 2 + 1, self.n_fft // 2 + 1], dim=-1)
        spec = torch.polar(torch.exp(log_mag.clamp(max=6.0)), phase)
        return torch.fft.irfft(spec, n=self.n_fft, dim=-1) * self.window

    def _features(self, mel: Tensor) -> Tensor:
        h = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, mel: Tensor) -> Tensor:
        """(B, n_mels, F) -> (B, 1, F * hop)."""
        frames = self._frames(self._features(mel))                                   # (B, F, n_fft)
        n = frames.shape[1]
        length = (n - 1) * self.hop + self.n_fft
        wav = F.fold(frames.transpose(1, 2), (1, length), (1, self.n_fft), stride=(1, self.hop))
        wav = wav[:, 0, 0, : n * self.hop]
        return (wav / self.envelope.repeat(n))[:, None]

    def init_state(self, batch: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> list[Any]:
        convs = [self.embed.init_state(batch, device, dtype)]
        convs += [block.init_state(batch, device, dtype) for block in self.blocks]
        return [convs, OverlapAddState(torch.zeros(batch, self.n_fft - self.hop, device=device))]

    def step(self, mel: Tensor, state: list[Any]) -> tuple[Tensor, list[Any]]:
        """(B, n_mels, k) frames -> (B, 1, k * hop) samples; the same numbers as `forward`."""
        convs, overlap = state
        h, embed_state = self.embed.step(mel, convs[0])
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        block_states = []
        for block, s in zip(self.blocks, convs[1:]):
            h, s = block.step(h, s)
            block_states.append(s)
        frames = self._frames(h)
        tail, out = overlap.tail, []
        for t in range(frames.shape[1]):
            buf = frames[:, t] + F.pad(tail, (0, self.hop))
            out.append(buf[:, : self.hop] / self.envelope)
            tail = buf[:, self.hop:]
        wav = torch.cat(out, dim=-1) if out else frames.new_zeros(frames.shape[0], 0)
        return wav[:, None], [[embed_state, *block_states], OverlapAddState(tail)]


class MelCodec(CodecShape, nn.Module):
    """Codec with offline (`encode`/`decode`) and streaming (`encode_step`/`decode_step`) paths
    that give the same codes and samples; the streaming state lives with the caller."""

    kind = "mel"

    def __init__(self, config: MelCodecConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or MelCodecConfig()
        self.front_end = CausalLogMel(cfg)
        self.register_buffer("mel_floor", torch.full((cfg.n_mels,), math.log(LOG_FLOOR)))
        self.register_buffer("mel_mean", torch.zeros(cfg.n_mels))
        self.register_buffer("mel_std", torch.ones(cfg.n_mels))
        self.quantizer = ResidualVectorQuantizer(cfg.n_mels, cfg.n_codebooks, cfg.codebook_size)
        self.vocoder = CausalVocoder(cfg)

    @property
    def delay_samples(self) -> int:
        """Output sample s reconstructs input sample s - delay_samples (overlap-add of n_fft)."""
        return self.config.vocoder_n_fft - self.config.hop_length

    @property
    def algorithmic_latency_ms(self) -> float:
        """From a sample's arrival to its reconstruction: the rest of its hop plus the delay."""
        return 1000.0 * (self.config.hop_length + self.delay_samples) / self.config.sample_rate

    # --- whole sequences ---------------------------------------------------------------------

    def normalized_mel(self, wav: Tensor) -> Tensor:
        """(B, 1, T) -> (B, n_mels, ceil(T / hop)) log-mel in corpus units (the quantizer's input)."""
        return self.normalize(self.front_end(self._pad(wav)))

    def normalize(self, mel: Tensor) -> Tensor:
        """Raw log-mel -> corpus units. Levels below the corpus's per-bin floor are lifted to it:
        digital silence (or a quieter room than any in training) then codes like the corpus's
        quietest frames instead of landing far from every code."""
        mel = torch.maximum(mel, self.mel_floor[:, None])
        return (mel - self.mel_mean[:, None]) / self.mel_std[:, None]

    def quantizer_scale(self) -> Tensor:
        """(n_mels,) what the quantizer sees per bin of the normalised mel: (std^p), mean 1.

        z-scores give a bin that barely moves (the top of the band, silence's floor) the weight of
        one that carries the formants; with p = 1 the k-means error is measured in log-mel units,
        which measured better on unseen voices and on the test split (docs/history.md, 2026-12-01)."""
        scale = self.mel_std ** self.config.quantizer_weighting
        return scale / scale.mean()

    def quantize(self, mel: Tensor) -> Tensor:
        """Normalised mel (B, n_mels, F) -> codes (B, n_codebooks, F)."""
        return self.quantizer.encode(mel * self.quantizer_scale()[:, None])

    def dequantize(self, codes: Tensor) -> Tensor:
        """codes (B, k, F) -> the normalised mel they stand for (B, n_mels, F): the vocoder's input."""
        return self.quantizer.decode(codes) / self.quantizer_scale()[:, None]

    def encode(self, wav: Tensor) -> Tensor:
        """(B, 1, T) -> codes (B, n_codebooks, ceil(T / hop)) long."""
        return self.quantize(self.normalized_mel(wav))

    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, k, F), k <= n_codebooks -> wav (B, 1, F * hop), `delay_samples` late."""
        return self.vocoder(self.dequantize(codes))

    # --- streaming ---------------------------------------------------------------------------

    def init_encoder_state(self, batch: int) -> FrameState:
        return self.front_end.init_state(batch, self.mel_mean.device)

    def encode_step(self, wav_chunk: Tensor, state: FrameState) -> tuple[Tensor, FrameState]:
        """Whole hops of live audio in, their codes (B, n_q, k) out; equals `encode` when joined."""
        if wav_chunk.shape[-1] % self.hop_length:
            raise ValueError(f"encode_step takes whole hops of {self.hop_length} samples, got {wav_chunk.shape[-1]}")
        mel, state = self.front_end.step(wav_chunk, state)
        return self.quantize(self.normalize(mel)), state

    def init_decoder_state(self, batch: int) -> list[Any]:
        return self.vocoder.init_state(batch, self.mel_mean.device)

    def decode_step(self, codes: Tensor, state: list[Any]) -> tuple[Tensor, list[Any]]:
        """codes (B, k, n_frames) -> audio (B, 1, n_frames * hop); equals `decode` when joined."""
        return self.vocoder.step(self.dequantize(codes), state)

    # --- fitting the quantizer ---------------------------------------------------------------

    @torch.no_grad()
    def fit_normalization(self, mels: Tensor) -> None:
        """Per-bin level floor, then mean and std, of raw log-mel frames (N, n_mels) of the corpus."""
        rank = max(1, int(FLOOR_QUANTILE * len(mels)))
        self.mel_floor.copy_(mels.kthvalue(rank, dim=0).values)
        mels = torch.maximum(mels, self.mel_floor)
        self.mel_mean.copy_(mels.mean(0))
        self.mel_std.copy_(mels.std(0).clamp_min(1e-3))

    @torch.no_grad()
    def fit_quantizer(self, frames: Tensor, iterations: int = 20, seed: int = 0) -> list[float]:
        """k-means each codebook on what the ones before it left of normalised frames (N, n_mels).

        Returns the mean squared residual after each codebook, the quantizer's own error curve.
        """
        generator = torch.Generator().manual_seed(seed)
        residual, errors = frames.float() * self.quantizer_scale().cpu(), []
        for layer in self.quantizer.layers:
            layer.codebook.copy_(kmeans(residual, self.config.codebook_size, iterations, generator))
            layer.initialized.fill_(True)
            residual -= layer.decode(layer.encode(residual))
            errors.append(float(residual.pow(2).mean()))
        return errors

    # --- checkpoints -------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.config.to_dict()}

    @classmethod
    def from_config_dict(cls, values: dict[str, Any]) -> MelCodec:
        return cls(MelCodecConfig.from_dict({k: v for k, v in values.items() if k != "kind"}))

    def check_compatible(self, config_dict: dict[str, Any]) -> None:
        """Raise ValueError naming every field where a checkpoint's config differs from this model's."""
        check_same_architecture(self.config, MelCodecConfig.from_dict({k: v for k, v in config_dict.items()
                                                                        if k != "kind"}))

    def load_checkpoint_state(self, state_dict: dict[str, Tensor], config_dict: dict[str, Any]) -> None:
        self.check_compatible(config_dict)
        self.load_state_dict(state_dict)


def kmeans(x: Tensor, k: int, iterations: int, generator: torch.Generator, chunk: int = 16384) -> Tensor:
    """Lloyd's k-means of (N, D) points; a cluster left empty is reseeded on a random point.

    Seeded from distinct random points; distances in chunks so N x k never sits in memory.
    """
    if len(x) < k:
        raise ValueError(f"k-means needs at least {k} frames to fit {k} codes, got {len(x)}")
    centroids = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iterations):
        sums, counts = torch.zeros_like(centroids), torch.zeros(k)
        c_sq = centroids.pow(2).sum(1)
        for piece in x.split(chunk):
            nearest = (c_sq[None] - 2 * piece @ centroids.t()).argmin(1)
            sums.index_add_(0, nearest, piece)
            counts += torch.bincount(nearest, minlength=k).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            centroids[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=generator)]
    return centroids
