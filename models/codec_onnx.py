"""TeluCodec's streaming decoder on ONNX Runtime: the samples of `decode_step`, with less overhead.

Why: decoding one 20 ms frame runs some thirty small convolutions. In eager PyTorch each call
costs tens of microseconds of dispatch and allocation, which is most of the time at batch 1 (a
single live stream); ONNX Runtime runs the same graph with far less per-op overhead. The graph is
exported from the model itself (codes in, quantizer lookup and decoder step, audio and the new
state out), so it cannot drift from the PyTorch path, and a test holds the two to 1e-5.

The state is explicit, as in models/streaming.py: a list of float32 arrays, batch first, that the
caller keeps per stream and passes back in. Each call decodes exactly one frame. With a fixed
`batch` (1 for one live stream) every shape in the graph is static and ONNX Runtime folds the
shape arithmetic away (495 exported nodes become 90); `batch=None` exports a dynamic batch for
decoding many sessions in one call, at some per-call cost.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.codec import TeluCodec
from models.streaming import flatten_state, unflatten_state


class _DecodeStep(nn.Module):
    """codes (B, K, 1) and the flat decoder state -> audio (B, 1, hop) and the new flat state."""

    def __init__(self, codec: TeluCodec, template: list[Any]) -> None:
        super().__init__()
        self.codec = codec
        self.template = template

    def forward(self, codes: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        audio, new_state = self.codec.decode_step(codes, unflatten_state(self.template, iter(state)))
        return (audio, *flatten_state(new_state))


class OnnxStreamingDecoder:
    """`init_state(batch)` then `step(codes, state)` per frame, like TeluCodec.decode_step."""

    def __init__(self, codec: TeluCodec, batch: int | None = 1, threads: int = 1) -> None:
        import onnxruntime as ort

        codec = codec.eval()
        self.batch = batch
        self.n_codebooks = codec.config.n_codebooks
        self.hop = codec.hop_length
        template = codec.init_decoder_state(batch or 2)
        example = flatten_state(template)
        self.state_names = [f"state{i}" for i in range(len(example))]
        names = ["codes", *self.state_names]
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-int shapes: fixed by design
            torch.onnx.export(
                _DecodeStep(codec, template),
                (torch.zeros(batch or 2, self.n_codebooks, 1, dtype=torch.long), *example),
                buffer, input_names=names, output_names=["audio", *(f"{n}_out" for n in self.state_names)],
                dynamic_axes=None if batch else {n: {0: "batch"} for n in names}, opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        self._zero_state = [t[:1].numpy() for t in example]

    def init_state(self, batch: int | None = None) -> list[np.ndarray]:
        """Zeros as the past, as TeluCodec.init_decoder_state (the fixed batch when there is one)."""
        batch = batch or self.batch
        if batch is None or (self.batch is not None and batch != self.batch):
            raise ValueError(f"this decoder was exported for batch {self.batch}: init_state({self.batch})")
        return [np.zeros((batch, *t.shape[1:]), dtype=np.float32) for t in self._zero_state]

    def step(self, codes: np.ndarray | Tensor, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """codes (B, n_codebooks, 1) -> audio (B, 1, hop) float32 and the new state."""
        codes = codes.numpy() if isinstance(codes, Tensor) else np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1] != self.n_codebooks or codes.shape[2] != 1:
            raise ValueError(f"expected codes (batch, {self.n_codebooks}, 1), got {tuple(codes.shape)}")
        if len(state) != len(self.state_names) or state[0].shape[0] != codes.shape[0]:
            raise ValueError("the state does not belong to this decoder or batch: make it with init_state(batch)")
        if self.batch is not None and codes.shape[0] != self.batch:
            raise ValueError(f"this decoder was exported for batch {self.batch}, got codes of batch {codes.shape[0]}")
        outputs = self.session.run(None, {"codes": codes.astype(np.int64, copy=False),
                                          **dict(zip(self.state_names, state))})
        return outputs[0], outputs[1:]
