"""Non-intrusive MOS predictors: how natural a clip sounds, with no reference to compare it to.

Two predictors, both shipped with their weights in their packages (no network is used):

- DNSMOS (Microsoft's DNS challenge, ONNX, through `speechmos`): P.808 MOS and the P.835
  triple SIG (speech), BAK (background), OVRL (overall), each 1-5. It scores 9.01 s windows at
  1 s hops and averages them; a shorter clip is looped to one window.
- DistillMOS (`distillmos`, a small conv + transformer model distilled from XLS-R SQA): one MOS,
  1-5; run under torch inference_mode.

MosScorer loads each predictor once, on first use: DNSMOS's first call costs ~18 s (numba and
ONNX warm-up) and later calls are fast, so one scorer should be kept for a whole evaluation.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

SAMPLE_RATE = 16000
MIN_SECONDS = 0.25
PREDICTORS: dict[str, tuple[str, ...]] = {
    "dnsmos": ("dnsmos_p808", "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak"),
    "distillmos": ("distillmos",),
}


class MosScorer:
    """Mean-opinion-score predictors, each loaded lazily and once.

    `threads` caps the intra-op threads of DNSMOS's ONNX sessions (None: onnxruntime's default,
    every core); DistillMOS runs under torch's own thread setting.
    """

    def __init__(self, predictors: Sequence[str] = ("dnsmos", "distillmos"), threads: int | None = None) -> None:
        predictors = list(predictors)
        unknown = [p for p in predictors if p not in PREDICTORS]
        if unknown or not predictors:
            raise ValueError(f"unknown MOS predictor(s) {unknown or predictors}: known ones are "
                             f"{', '.join(PREDICTORS)}")
        self.predictors = list(dict.fromkeys(predictors))
        self.threads = threads
        self._loaded: dict[str, Callable[[np.ndarray], dict[str, float]]] = {}

    @property
    def keys(self) -> list[str]:
        """The keys score_clip returns, in order."""
        return [key for p in self.predictors for key in PREDICTORS[p]]

    def score_clip(self, audio: np.ndarray, sample_rate: int) -> dict[str, float]:
        """Every key of every predictor for one mono clip (resampled to 16 kHz, clipped to [-1, 1])."""
        clip = prepare(audio, sample_rate)
        scores: dict[str, float] = {}
        for name in self.predictors:
            scores.update(self._predictor(name)(clip))
        return scores

    def score(self, clips: Sequence[np.ndarray], sample_rate: int = SAMPLE_RATE,
              desc: str = "MOS") -> dict[str, float]:
        """The mean of each key over `clips`."""
        if len(clips) == 0:
            raise ValueError("no clips to score")
        rows = [self.score_clip(clip, sample_rate) for clip in tqdm(clips, desc=desc, unit="clip")]
        return {key: float(np.mean([row[key] for row in rows])) for key in self.keys}

    def _predictor(self, name: str) -> Callable[[np.ndarray], dict[str, float]]:
        if name not in self._loaded:
            self._loaded[name] = {"dnsmos": _load_dnsmos, "distillmos": _load_distillmos}[name](self.threads)
        return self._loaded[name]


def prepare(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz in [-1, 1]; ValueError for an empty, too short or non-finite clip."""
    clip = np.asarray(audio)
    if clip.dtype == np.int16:
        clip = clip.astype(np.float32) / 32768.0
    clip = clip.astype(np.float32, copy=False)
    if clip.ndim == 2 and 1 in clip.shape:
        clip = clip.reshape(-1)
    if clip.ndim != 1:
        raise ValueError(f"a MOS clip must be mono (1-D), got shape {clip.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    if clip.size == 0:
        raise ValueError("cannot score an empty clip")
    seconds = clip.size / sample_rate
    if seconds < MIN_SECONDS:
        raise ValueError(f"clip too short to score: {seconds:.3f} s (at least {MIN_SECONDS} s)")
    if not np.isfinite(clip).all():
        raise ValueError("clip has NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        import torchaudio.functional as AF

        clip = AF.resample(torch.from_numpy(clip), sample_rate, SAMPLE_RATE).numpy()
    return np.clip(clip, -1.0, 1.0).astype(np.float32)


def _load_dnsmos(threads: int | None) -> Callable[[np.ndarray], dict[str, float]]:
    """speechmos's DNSMOS with its two ONNX sessions made here, so their threads can be capped.

    A clip shorter than DNSMOS's 9.01 s window is looped here to exactly one window: speechmos
    would double it until it is longer and score every 1 s hop of the result (a 2 s clip: 8
    windows of the same looped content), the same score for up to 10x the time.
    """
    import os

    import onnxruntime as ort
    from speechmos import dnsmos

    folder = os.path.join(os.path.dirname(os.path.abspath(dnsmos.__file__)), "dnsmos_models")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    model = dnsmos.DNSMOS.__new__(dnsmos.DNSMOS)
    model.primary_model_path = os.path.join(folder, "sig_bak_ovr.onnx")
    model.onnx_sess = ort.InferenceSession(model.primary_model_path, options, providers=["CPUExecutionProvider"])
    model.p808_onnx_sess = ort.InferenceSession(os.path.join(folder, "model_v8.onnx"), options,
                                                providers=["CPUExecutionProvider"])

    window = int(dnsmos.INPUT_LENGTH * SAMPLE_RATE)

    def run(clip: np.ndarray) -> dict[str, float]:
        if len(clip) < window:  # loop it to exactly one window (see _load_dnsmos)
            clip = np.tile(clip, -(-window // len(clip)))[:window]
        out: dict[str, Any] = model(clip, SAMPLE_RATE, False)
        return {"dnsmos_p808": float(out["p808_mos"]), "dnsmos_ovrl": float(out["ovrl_mos"]),
                "dnsmos_sig": float(out["sig_mos"]), "dnsmos_bak": float(out["bak_mos"])}

    return run


def _load_distillmos(threads: int | None) -> Callable[[np.ndarray], dict[str, float]]:
    import distillmos

    with contextlib.redirect_stdout(io.StringIO()):  # it prints where its weights came from
        model = distillmos.ConvTransformerSQAModel()
    model.eval()

    def run(clip: np.ndarray) -> dict[str, float]:
        with torch.inference_mode():
            return {"distillmos": float(model(torch.from_numpy(clip)[None]).reshape(-1)[0])}

    return run
