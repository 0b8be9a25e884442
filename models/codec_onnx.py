"""TeluCodec's streaming decoder (v1 or v2) on ONNX Runtime: the samples of `decode_step`, with less overhead.

Why: decoding one 20 ms frame runs some thirty small convolutions. In eager PyTorch each call
costs tens of microseconds of dispatch and allocation, which is most of the time at batch 1 (a
single live stream); ONNX Runtime runs the same graph with far less per-op overhead. The graph is
exported from the model itself (codes in, quantizer lookup and decoder step, audio and the new
state out), so it cannot drift from the PyTorch path, and a test holds the two to 1e-5. One
substitution is made for the export only: ELU becomes max(x, exp(min(x, 0)) - 1), the same
function, because ONNX Runtime's Elu kernel is not vectorised (13 us for 16 x 320 values on one
thread, against 4 us for its Exp; the four kernels together take 9 us). For v2 (models/mel_codec.py)
the vocoder's inverse FFT and complex polar form, which ONNX has no kernel for, become the same
sums as two matrix products with windowed cosine and sine bases (`_frames_by_matmul`).

The state is explicit, as in models/streaming.py, and belongs to the caller, one per stream, so
one decoder serves any number of streams. Two forms, the same samples:
  - `init_state(batch)` / `step(codes, state) -> (audio, state)`: a list of float32 arrays, batch
    first, passed in and returned anew (functional: an old state stays valid);
  - `init_bound_state(batch)` / `step_bound(codes, state) -> audio`: the state lives in buffers
    bound to the session once (IOBinding, two sets used in turn) and is advanced in place. `step`
    hands ONNX Runtime a dict of arrays and gets fresh ones back, wrapping, checking and
    allocating every input and output on every call: about 0.04 ms of a 0.36 ms frame at batch 1.
    The bound form is the one for a live stream.
Each call decodes exactly one frame. The state holds only the non-empty buffers (a 1x1 conv keeps
no past). With a fixed `batch` (1 for one live stream) every shape in the graph is static and ONNX
Runtime folds the shape arithmetic away (344 exported nodes become 112 kernels); `batch=None`
exports a dynamic batch for decoding many sessions in one call, at some per-call cost.

Timings and the variants tried and left out: docs/history.md (models/codec_onnx.py).
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from models.codec import TeluCodec
from models.mel_codec import CausalVocoder, MelCodec
from models.streaming import flatten_state, unflatten_state

if TYPE_CHECKING:
    from onnxruntime import InferenceSession


class _EluAsMax(nn.Module):
    """ELU(x) = max(x, alpha * (exp(min(x, 0)) - 1)) for 0 <= alpha <= 1 (x <= 0 gives
    alpha * (e^x - 1) >= e^x - 1 >= x; x > 0 gives x > 0): ONNX Clip, Exp, Sub, Max, all
    vectorised in ONNX Runtime, where its Elu kernel is not."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        negative = torch.exp(torch.clamp(x, max=0.0)) - 1.0
        return torch.maximum(x, negative if self.alpha == 1.0 else self.alpha * negative)


def _with_vectorised_elu(module: nn.Module) -> None:
    """Swap every nn.ELU inside `module` (in place) for `_EluAsMax`."""
    for name, child in module.named_children():
        if isinstance(child, nn.ELU) and 0.0 <= child.alpha <= 1.0:
            setattr(module, name, _EluAsMax(child.alpha))
        else:
            _with_vectorised_elu(child)


def _inverse_rfft_bases(n_fft: int, window: Tensor) -> tuple[Tensor, Tensor]:
    """(bins, n_fft) matrices with irfft(re + i im) * window = re @ cos_basis + im @ sin_basis:
    inner bins count twice, and the imaginary parts of DC and Nyquist are ignored, as irfft does."""
    bins = n_fft // 2 + 1
    k = torch.arange(bins, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    weight = torch.full((bins, 1), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if n_fft % 2 == 0:
        weight[-1] = 1.0
    angle = 2.0 * torch.pi * k * n / n_fft
    cos_basis = weight * torch.cos(angle) / n_fft * window.double()
    sin_basis = -weight * torch.sin(angle) / n_fft * window.double()
    sin_basis[0] = 0.0
    if n_fft % 2 == 0:
        sin_basis[-1] = 0.0
    return cos_basis.float(), sin_basis.float()


def _frames_by_matmul(vocoder: CausalVocoder) -> None:
    """Replace (in place, on a copy made for the export) the vocoder's polar + irfft + window by
    the same sums as matrix products, which export to ONNX."""
    cos_basis, sin_basis = _inverse_rfft_bases(vocoder.n_fft, vocoder.window)
    bins = vocoder.n_fft // 2 + 1

    def frames(h: Tensor) -> Tensor:
        x = vocoder.head(vocoder.final_norm(h.transpose(1, 2)))
        log_mag, phase = x.float().split([bins, bins], dim=-1)
        magnitude = torch.exp(log_mag.clamp(max=6.0))
        return (magnitude * torch.cos(phase)) @ cos_basis + (magnitude * torch.sin(phase)) @ sin_basis

    vocoder._frames = frames


class _DecodeStep(nn.Module):
    """codes (B, K, 1) and the non-empty flat decoder state -> audio (B, 1, hop) and its successor.

    Buffers of length 0 (none kept) are rebuilt here instead of crossing the graph's boundary:
    each graph input and output costs a little on every call."""

    def __init__(self, codec: TeluCodec | MelCodec, template: list[Any], kept: list[int]) -> None:
        super().__init__()
        self.codec = codec
        self.template = template
        self.kept = kept
        self.empty = flatten_state(template)

    def forward(self, codes: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        flat = [codes.new_zeros((codes.shape[0], *t.shape[1:]), dtype=t.dtype) for t in self.empty]
        for i, tensor in zip(self.kept, state):
            flat[i] = tensor
        audio, new_state = self.codec.decode_step(codes, unflatten_state(self.template, iter(flat)))
        new_flat = flatten_state(new_state)
        return (audio, *(new_flat[i] for i in self.kept))


class BoundDecoderState:
    """One stream's decoder state, held in ONNX Runtime buffers bound to the decoder's session.

    Two sets of state buffers are allocated and bound once, in two IOBindings: one reads set A and
    writes set B, the other the reverse, and each step runs one and flips (ping-pong), so a step
    copies the codes in, runs, and copies the audio out, nothing else. Make one per stream with
    `OnnxStreamingDecoder.init_bound_state`; the decoder itself keeps nothing of any stream, as
    with the functional state. Unlike that state, this one is advanced in place: one caller at a
    time, and a step cannot be retried from the state before it.
    """

    def __init__(self, session: InferenceSession, names: list[str], states: list[np.ndarray],
                 codes_shape: tuple[int, ...], audio_shape: tuple[int, ...]) -> None:
        import onnxruntime as ort

        self._session = session  # the bindings belong to this session: keep it alive with them
        self._codes = np.zeros(codes_shape, dtype=np.int64)
        self._audio = np.zeros(audio_shape, dtype=np.float32)
        # ortvalue_from_numpy wraps CPU arrays without copying: these arrays are the bound memory.
        self._sets = [[np.array(s, dtype=np.float32, order="C") for s in states],
                      [np.empty(s.shape, dtype=np.float32) for s in states]]
        codes_value = ort.OrtValue.ortvalue_from_numpy(self._codes)
        audio_value = ort.OrtValue.ortvalue_from_numpy(self._audio)
        values = [[ort.OrtValue.ortvalue_from_numpy(a) for a in arrays] for arrays in self._sets]
        self._bindings = []
        for read, write in ((0, 1), (1, 0)):
            binding = session.io_binding()
            binding.bind_ortvalue_input("codes", codes_value)
            binding.bind_ortvalue_output("audio", audio_value)
            for name, value_in, value_out in zip(names, values[read], values[write]):
                binding.bind_ortvalue_input(name, value_in)
                binding.bind_ortvalue_output(f"{name}_out", value_out)
            self._bindings.append(binding)
        self._values = values  # the OrtValues must outlive the bindings
        self._current = 0      # the set that holds the state now

    @property
    def batch(self) -> int:
        return self._codes.shape[0]

    def arrays(self) -> list[np.ndarray]:
        """A copy of the state as `OnnxStreamingDecoder.step` takes it."""
        return [a.copy() for a in self._sets[self._current]]

    def _step(self, codes: np.ndarray) -> np.ndarray:
        self._codes[...] = codes
        self._session.run_with_iobinding(self._bindings[self._current])
        self._current ^= 1
        return self._audio.copy()  # the bound buffer is overwritten by the next step


class OnnxStreamingDecoder:
    """`init_state(batch)` then `step(codes, state)` per frame, like TeluCodec.decode_step; or
    `init_bound_state(batch)` then `step_bound(codes, state)`, the same with less per-call cost."""

    def __init__(self, codec: TeluCodec | MelCodec, batch: int | None = 1, threads: int = 1) -> None:
        import onnxruntime as ort

        self.batch = batch
        self.n_codebooks = codec.config.n_codebooks
        self.hop = codec.hop_length
        exported = copy.deepcopy(codec).eval()  # the caller's model keeps its own modules
        if isinstance(exported, MelCodec):
            _frames_by_matmul(exported.vocoder)
        else:
            _with_vectorised_elu(exported.decoder)
        template = exported.init_decoder_state(batch or 2)
        example = flatten_state(template)
        kept = [i for i, t in enumerate(example) if t.shape[-1] > 0]
        self.state_names = [f"state{i}" for i in kept]
        names = ["codes", *self.state_names]
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-int shapes: fixed by design
            torch.onnx.export(
                _DecodeStep(exported, template, kept),
                (torch.zeros(batch or 2, self.n_codebooks, 1, dtype=torch.long), *(example[i] for i in kept)),
                buffer, input_names=names, output_names=["audio", *(f"{n}_out" for n in self.state_names)],
                dynamic_axes=None if batch else {n: {0: "batch"} for n in names}, opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        self._zero_state = [example[i][:1].numpy() for i in kept]

    def _check_batch(self, batch: int | None) -> int:
        batch = batch or self.batch
        if batch is None or (self.batch is not None and batch != self.batch):
            raise ValueError(f"this decoder was exported for batch {self.batch}: init_state({self.batch})")
        return batch

    def _check_codes(self, codes: np.ndarray | Tensor) -> np.ndarray:
        codes = codes.numpy() if isinstance(codes, Tensor) else np.asarray(codes)
        if codes.ndim != 3 or codes.shape[1] != self.n_codebooks or codes.shape[2] != 1:
            raise ValueError(f"expected codes (batch, {self.n_codebooks}, 1), got {tuple(codes.shape)}")
        if self.batch is not None and codes.shape[0] != self.batch:
            raise ValueError(f"this decoder was exported for batch {self.batch}, got codes of batch {codes.shape[0]}")
        return codes

    def init_state(self, batch: int | None = None) -> list[np.ndarray]:
        """Zeros as the past, as TeluCodec.init_decoder_state (the fixed batch when there is one)."""
        batch = self._check_batch(batch)
        return [np.zeros((batch, *t.shape[1:]), dtype=np.float32) for t in self._zero_state]

    def step(self, codes: np.ndarray | Tensor, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """codes (B, n_codebooks, 1) -> audio (B, 1, hop) float32 and the new state."""
        codes = self._check_codes(codes)
        if len(state) != len(self.state_names) or state[0].shape[0] != codes.shape[0]:
            raise ValueError("the state does not belong to this decoder or batch: make it with init_state(batch)")
        outputs = self.session.run(None, {"codes": codes.astype(np.int64, copy=False),
                                          **dict(zip(self.state_names, state))})
        return outputs[0], outputs[1:]

    def init_bound_state(self, batch: int | None = None, state: list[np.ndarray] | None = None) -> BoundDecoderState:
        """A new stream's state for `step_bound`: zeros as the past, or a copy of `state` (from
        `init_state`/`step`, or another bound state's `arrays()`) to go on from there."""
        batch = self._check_batch(batch)
        if state is None:
            state = self.init_state(batch)
        elif len(state) != len(self.state_names) or any(
                s.shape != (batch, *t.shape[1:]) for s, t in zip(state, self._zero_state)):
            raise ValueError("the state does not belong to this decoder or batch: make it with init_state(batch)")
        return BoundDecoderState(self.session, self.state_names, state, (batch, self.n_codebooks, 1),
                                 (batch, 1, self.hop))

    def step_bound(self, codes: np.ndarray | Tensor, state: BoundDecoderState) -> np.ndarray:
        """codes (B, n_codebooks, 1) -> audio (B, 1, hop) float32; `state` is advanced in place."""
        codes = self._check_codes(codes)
        if state._session is not self.session:
            raise ValueError("the state belongs to another decoder: make it with init_bound_state")
        if codes.shape[0] != state.batch:
            raise ValueError(f"the state is for batch {state.batch}, got codes of batch {codes.shape[0]}")
        return state._step(codes)
