"""Reduced precision on the CPU for serving: int8 dynamic quantization of the linear layers.

`with_precision(bundle, "int8")` returns a copy of the bundle whose S2S transformer blocks
(attention and MLP linears) and codec decoder MLPs run as int8 dynamic-quantized matmuls
(torch.ao.quantization.quantize_dynamic: weights int8 per channel, activations quantized per
batch on the fly). Untouched: the codec encoder (its codes must not change), the vocoder's
output head (its phases feed an inverse FFT) and the S2S output heads (the sampled
distributions; the KV cache also takes its dtype from them). "fp32" returns the bundle as it is.
Activations are scaled per batch, so under int8 a reply depends slightly on the rows batched
with it: the engine's batched-equals-one-by-one contract holds only approximately (exactly at
fp32), and with sampling a token can come out differently. Whether quality holds is measured by the project's quality evaluation of the same bundle both
ways (docs/benchmarks.md); the serving setting is `serving.precision`.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from serving.bundle import ModelBundle

PRECISIONS = ("fp32", "int8")


def _quantize(module: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """int8 dynamic quantization of the nn.Linear layers of `module` (a copy), except those whose
    name starts with one of `skip`."""
    names = {name for name, m in module.named_modules() if isinstance(m, nn.Linear) and not name.startswith(skip)}
    if not names:
        return module
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(module), names, dtype=torch.qint8)


def with_precision(bundle: ModelBundle, precision: str) -> ModelBundle:
    """The bundle with its models at `precision` (one of PRECISIONS); a ValueError names them otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"serving.precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return bundle
    if next(bundle.s2s.parameters()).device.type != "cpu":
        raise ValueError("serving.precision int8 is for the CPU (dynamic quantization); use fp32 on a GPU")
    codec = bundle.codec
    vocoder = getattr(codec, "vocoder", None)
    if vocoder is not None:  # the mel codec: its decoder's MLPs, not the phase head
        codec = copy.copy(codec)
        codec._modules = dict(codec._modules)
        codec._modules["vocoder"] = _quantize(vocoder, skip=("head",))
    meta = {**bundle.meta, "serving_precision": precision}
    return replace(bundle, codec=codec, s2s=_quantize(bundle.s2s, skip=("heads", "text_head")).eval(), meta=meta)


__all__ = ["PRECISIONS", "with_precision"]
