"""Residual vector quantizer with EMA codebooks, dead-code restarts and quantizer dropout.

Why these pieces:
  - EMA codebook updates (k-means in small online steps) learn codebooks faster and more stably
    than a codebook loss, and leave the encoder only a commitment loss to keep it near them.
  - Codes that nothing picks for `dead_code_steps` training steps are moved onto random vectors of
    the current batch, so the whole codebook (and so the bitrate) gets used.
  - The first training batch seeds every codebook from data, which avoids a start where random
    codes sit far from the encoder's output and all vectors map to a handful of them.
  - Quantizer dropout trains each example with a random number of codebooks, so decoding with
    the first k of them still gives usable audio (bitrate chosen at inference).
Distances and updates run in float32 even under autocast: bf16 rounding moves argmin picks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    quantized: Tensor        # (B, D, F), straight-through: gradients reach the encoder unchanged
    codes: Tensor            # (B, n_codebooks, F) long
    commitment_loss: Tensor  # scalar, mean over codebooks of ||residual - sg(code vector)||^2


class VectorQuantizer(nn.Module):
    """One codebook of `codebook_size` vectors of size `dim`, learnt by EMA (no gradients)."""

    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99,
                 dead_code_steps: int = 50, eps: float = 1e-5) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.decay = decay
        self.dead_code_steps = dead_code_steps
        self.eps = eps
        codebook = torch.randn(codebook_size, dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(codebook_size))   # EMA of hits per code
        self.register_buffer("embed_sum", codebook.clone())               # EMA of vectors per code
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))

    def encode(self, x: Tensor) -> Tensor:
        """(N, D) -> (N,) index of the nearest code (squared Euclidean distance)."""
        distances = (x.pow(2).sum(1, keepdim=True) - 2 * x @ self.codebook.t()
                     + self.codebook.pow(2).sum(1)[None])
        return distances.argmin(dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        return F.embedding(codes, self.codebook)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Seed every code from the first training batch."""
        self._restart(torch.ones_like(self.steps_unused, dtype=torch.bool), x)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, x: Tensor, codes: Tensor) -> None:
        """One EMA step towards the mean of the vectors each code was picked for, then restarts."""
        counts = torch.bincount(codes, minlength=self.codebook_size).to(x.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, x)
        if dist.is_available() and dist.is_initialized():
            # Under DDP every rank sees a shard of the batch: pool the statistics of all of them.
            # (Restarts below draw from the local shard; DDP's buffer broadcast from rank 0 at
            # the next forward makes the ranks agree again.)
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing: a code with a near-zero EMA count must not divide by zero.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = self.steps_unused >= self.dead_code_steps
        if dead.any():
            self._restart(dead, x)

    def _restart(self, mask: Tensor, x: Tensor) -> None:
        """Put the codes in `mask` on random vectors of `x`, with EMA state that agrees."""
        picks = x[torch.randint(0, x.shape[0], (int(mask.sum()),), device=x.device)]
        self.codebook[mask] = picks
        self.embed_sum[mask] = picks
        self.cluster_size[mask] = 1.0
        self.steps_unused[mask] = 0


class ResidualVectorQuantizer(nn.Module):
    """n_codebooks quantizers in a chain, each coding what the ones before it left over."""

    def __init__(self, dim: int, n_codebooks: int, codebook_size: int, decay: float = 0.99,
                 dead_code_steps: int = 50, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_codebooks = n_codebooks
        self.dropout = dropout
        self.layers = nn.ModuleList(
            VectorQuantizer(dim, codebook_size, decay, dead_code_steps) for _ in range(n_codebooks))

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize (B, D, F); in training, also update the codebooks and apply quantizer dropout.

        Dropout keeps only the first k codebooks in the output of an example (k drawn per example),
        but every codebook still sees its residual, so all of them keep learning.
        """
        dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            batch, dim, frames = z.shape
            keep = self._codebooks_kept(batch, z.device)                       # (B, n_codebooks)
            residual = z.transpose(1, 2).reshape(-1, dim)                      # (B*F, D)
            quantized = torch.zeros_like(residual)
            codes, losses = [], []
            for i, layer in enumerate(self.layers):
                if self.training and not layer.initialized:
                    layer.initialize(residual.detach())
                idx = layer.encode(residual.detach())
                q = layer.decode(idx)
                if self.training:
                    layer.update(residual.detach(), idx)
                per_example = (residual - q.detach()).pow(2).reshape(batch, -1).mean(1)
                losses.append(per_example * keep[:, i])
                quantized = quantized + q * keep[:, i].repeat_interleave(frames)[:, None]
                residual = residual - q
                codes.append(idx.reshape(batch, frames))
            commitment_loss = torch.stack(losses).sum() / keep.sum()
            quantized = quantized.reshape(batch, frames, dim).transpose(1, 2)
            quantized = z + (quantized - z).detach()
        return QuantizerOutput(quantized.to(dtype), torch.stack(codes, dim=1), commitment_loss)

    def _codebooks_kept(self, batch: int, device: torch.device) -> Tensor:
        """(B, n_codebooks) 0/1 float mask: all ones, except under dropout in training."""
        n_kept = torch.full((batch,), self.n_codebooks, device=device)
        if self.training and self.dropout > 0:
            drop = torch.rand(batch, device=device) < self.dropout
            n_kept = torch.where(drop, torch.randint(1, self.n_codebooks + 1, (batch,), device=device), n_kept)
        return (torch.arange(self.n_codebooks, device=device)[None] < n_kept[:, None]).float()

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """(B, D, F) -> codes (B, n_codebooks, F); never touches the codebooks."""
        z = z.float()
        batch, dim, frames = z.shape
        residual = z.transpose(1, 2).reshape(-1, dim)
        codes = []
        for layer in self.layers:
            idx = layer.encode(residual)
            residual = residual - layer.decode(idx)
            codes.append(idx.reshape(batch, frames))
        return torch.stack(codes, dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, k, F) with k <= n_codebooks (the first k codebooks) -> (B, D, F)."""
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.n_codebooks:
            raise ValueError(f"expected codes (batch, 1..{self.n_codebooks}, frames), got {tuple(codes.shape)}")
        quantized = sum(layer.decode(codes[:, i]) for i, layer in enumerate(self.layers[: codes.shape[1]]))
        return quantized.transpose(1, 2)
