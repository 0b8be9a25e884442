"""Causal convolution blocks that run on whole sequences or chunk by chunk with explicit state.

Every streaming block has two paths that give the same numbers:
  - `forward(x)` on a whole sequence (training, offline encode/decode);
  - `step(x_chunk, state) -> (y_chunk, state)` for live audio, where `state` is a plain object made
    by `init_state(batch, device, dtype)` and returned anew by each step (nothing hides inside the
    module, so one model can serve many sessions, each holding its own state).
Causality makes this possible: an output never looks at inputs after it, so what a step needs
from the past fits in a small buffer. States keep the batch as their first dimension.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ConvState:
    """Inputs a causal conv has seen but not yet used up: the left context of the next output."""

    buffer: Tensor  # (B, C_in, L)


@dataclass
class ConvTransposeState:
    """The part of the last chunk's overlap-add output that reaches into the next chunk."""

    tail: Tensor  # (B, C_out, kernel_size - stride)


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only, so output t depends on inputs up to the end of its stride.

    The left padding is (dilation * (kernel - 1) + 1) - stride: with an input length that is a
    multiple of the stride, output j covers inputs up to j * stride + stride - 1 and the output
    length is exactly length // stride.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, dilation: int = 1, bias: bool = True, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, bias=bias,
                         groups=groups)
        self.receptive_field = dilation * (kernel_size - 1) + 1
        self.causal_padding = self.receptive_field - stride
        if self.causal_padding < 0:
            raise ValueError(f"kernel_size {kernel_size} with dilation {dilation} is shorter than stride {stride}")

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.causal_padding, 0)))

    def init_state(self, batch: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> ConvState:
        """Zeros as the past, the same as the zero padding of `forward`."""
        return ConvState(torch.zeros(batch, self.in_channels, self.causal_padding, device=device, dtype=dtype))

    def step(self, x: Tensor, state: ConvState) -> tuple[Tensor, ConvState]:
        """Emit every output whose inputs have all arrived; keep the rest for the next chunk.

        Any chunk length works; a chunk that is a multiple of the stride gives chunk // stride outputs.
        """
        if self.causal_padding == 0 and self.stride[0] == 1:  # a 1x1 conv: no past to keep
            if x.shape[-1] == 0:
                return x.new_zeros(x.shape[0], self.out_channels, 0), state
            return super().forward(x), state
        x = torch.cat([state.buffer, x], dim=-1)
        stride = self.stride[0]
        n_out = max(0, (x.shape[-1] - self.receptive_field) // stride + 1)
        if n_out == 0:
            return x.new_zeros(x.shape[0], self.out_channels, 0), ConvState(x)
        used = (n_out - 1) * stride + self.receptive_field
        # Slice only when inputs are left over: an exported graph keeps even a slice of everything.
        y = super().forward(x[..., :used] if used < x.shape[-1] else x)
        return y, ConvState(x[..., n_out * stride:])


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """Upsampling by `stride` whose output t depends on inputs up to t // stride.

    A transposed conv spreads each input over `kernel_size` outputs; the last kernel - stride of
    them overhang the end of the sequence and are trimmed, so T inputs give exactly T * stride
    outputs. Streaming keeps that overhang as an overlap-add tail for the next chunk.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        if kernel_size < stride:
            raise ValueError(f"kernel_size {kernel_size} is shorter than stride {stride}: outputs would be skipped")
        self.overhang = kernel_size - stride

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y[..., : y.shape[-1] - self.overhang]

    def init_state(self, batch: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> ConvTransposeState:
        return ConvTransposeState(torch.zeros(batch, self.out_channels, self.overhang, device=device, dtype=dtype))

    def step(self, x: Tensor, state: ConvTransposeState) -> tuple[Tensor, ConvTransposeState]:
        """Overlap-add the previous tail, emit chunk * stride outputs, keep the new tail.

        The bias is added on emission only: the tail is summed into the next chunk, so carrying
        the bias in it would count it twice.
        """
        if x.shape[-1] == 0:
            return x.new_zeros(x.shape[0], self.out_channels, 0), state
        n_out = x.shape[-1] * self.stride[0]
        if x.shape[-1] == 1:
            # One input frame (the per-frame decode): the transposed conv is a vector-matrix
            # product, (B, C_in) @ (C_in, C_out * kernel), which skips the col2im of the general
            # kernel (faster in eager PyTorch and on ONNX Runtime alike).
            y = (x[..., 0] @ self.weight.reshape(self.in_channels, -1)).view(x.shape[0], self.out_channels, -1)
        else:
            y = F.conv_transpose1d(x, self.weight, None, stride=self.stride)
        if self.overhang == n_out:  # the tail covers the emitted part exactly: add it, no padding
            out = y[..., :n_out] + state.tail
        else:
            y = y + F.pad(state.tail, (0, y.shape[-1] - self.overhang))
            out = y[..., :n_out]
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out, ConvTransposeState(y[..., n_out:])


class StreamingSequential(nn.Sequential):
    """nn.Sequential whose `step` threads one state per child.

    Children without `step` (activations) are pointwise, so they stream as they are and get None.
    """

    def init_state(self, batch: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> list[Any]:
        return [m.init_state(batch, device, dtype) if hasattr(m, "step") else None for m in self]

    def step(self, x: Tensor, state: list[Any]) -> tuple[Tensor, list[Any]]:
        new_state = []
        for module, s in zip(self, state):
            if s is None:
                x = module(x)
            else:
                x, s = module.step(x, s)
            new_state.append(s)
        return x, new_state


class ResidualUnit(nn.Module):
    """x + conv1x1(elu(dilated_causal_conv(elu(x)))), EnCodec's unit with a halved hidden width.

    The halved width keeps the per-frame cost of streaming decode low; the dilation widens the
    receptive field without more parameters.
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        self.block = StreamingSequential(
            nn.ELU(), CausalConv1d(channels, hidden, kernel_size, dilation=dilation),
            nn.ELU(), CausalConv1d(hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)

    def init_state(self, batch: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> list[Any]:
        return self.block.init_state(batch, device, dtype)

    def step(self, x: Tensor, state: list[Any]) -> tuple[Tensor, list[Any]]:
        """Stride-1 convs return one output per input at once, so the skip lines up with x."""
        y, state = self.block.step(x, state)
        return x + y, state


def flatten_state(state: Any) -> list[Tensor]:
    """The tensors of a (nested) streaming state in a fixed order, for runtimes that take flat
    inputs (ONNX Runtime); `unflatten_state` rebuilds the nesting from a template. A state is
    lists of dataclasses (ConvState, the vocoder's overlap-add tail...) whose tensor fields count."""
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in flatten_state(item)]
    if dataclasses.is_dataclass(state):
        return [value for f in dataclasses.fields(state) if isinstance(value := getattr(state, f.name), Tensor)]
    return []


def unflatten_state(template: Any, tensors: Any) -> Any:
    """Inverse of `flatten_state`: `tensors` (an iterator) laid out like `template`."""
    if isinstance(template, (list, tuple)):
        return [unflatten_state(item, tensors) for item in template]
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(template, **{f.name: next(tensors) for f in dataclasses.fields(template)
                                                if isinstance(getattr(template, f.name), Tensor)})
    return template
