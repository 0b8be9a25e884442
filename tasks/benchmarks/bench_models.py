"""`s2s bench codec` and `s2s bench s2s`: speed of the trained models on this machine.

Figures are medians over repeats, each beside a baseline measured in the same process (the
ratio is what travels between machines): the codec's streaming decode against its own
whole-sequence decode, and KV-cached generation against recomputing the full sequence each step.
Both run on one CPU thread unless told otherwise: one stream, as a server session would get.
Streaming decode is also timed at 2 and 4 frames per step, to show what per-call overhead costs,
and on ONNX Runtime (models/codec_onnx.py: the same graph exported from the model, with less per-op
overhead; its state bound to the session, and as numpy arrays passed in and out), against the
PyTorch step in the same process.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import numpy as np
import torch

from core.checkpoints import load_checkpoint
from core.config import Params
from models.codecs import Codec, codec_from_config
from models.s2s_transformer import S2SConfig, S2STransformer, prompt_tokens
from tasks.training.tokenize_corpus import load_codec


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trained_codec(params: Params) -> tuple[Codec, str]:
    checkpoint = params.path(params.codec_train.out_dir) / "last.pt"
    if checkpoint.is_file():
        return load_codec(checkpoint), str(checkpoint.relative_to(params.root))
    return codec_from_config(params.codec.architecture()).eval(), "untrained (params.yaml)"


def previous_codec(params: Params) -> Codec:
    """TeluCodec v1 as it last shipped (4 x 256 codes, 1.6 kbps): the baseline of the cost ratios.
    Untrained weights cost the same as trained ones."""
    config = {"kind": "conv", "sample_rate": params.codec.sample_rate, "n_codebooks": 4, "codebook_size": 256,
              **params.codec.conv.model_dump(mode="json")}
    return codec_from_config(config).eval()


@torch.inference_mode()
def bench_codec(params: Params, seconds: float = 10.0, frames: int = 250, repeats: int = 5, threads: int = 1) -> dict:
    """The codec's speed, and the same figures for the previous model (v1) measured in this run,
    with `*_vs_previous` ratios (> 1: the new codec is faster)."""
    torch.set_num_threads(threads)
    codec, source = trained_codec(params)
    report = {"model": source, **_bench_one(codec, seconds, frames, repeats, threads)}
    previous = _bench_one(previous_codec(params), seconds, frames, repeats, threads)
    report |= {f"previous_{k}": v for k, v in previous.items()}
    for key in ("encode_x_realtime", "decode_x_realtime", "stream_decode_x_realtime",
                "stream_decode_x_realtime_per_session_batch_64"):
        report[f"{key}_vs_previous"] = round(report[key] / previous[key], 2)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return report


def _bench_one(codec: Codec, seconds: float, frames: int, repeats: int, threads: int) -> dict:
    sr, hop = codec.config.sample_rate, codec.hop_length
    rng = np.random.default_rng(0)
    wav = torch.from_numpy((0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32))[None, None]
    encode_s = _median_seconds(lambda: codec.encode(wav), repeats)
    codes = codec.encode(wav)
    decode_s = _median_seconds(lambda: codec.decode(codes), repeats)

    frame_ms = 1000 * hop / sr
    whole_per_frame_ms = 1000 * decode_s / codes.shape[-1]
    chunked: dict[str, float] = {}
    for chunk in (1, 2, 4):  # frames decoded per step: more frames, less per-call overhead, more latency
        per_step: list[float] = []
        for _ in range(repeats):
            state = codec.init_decoder_state(1)
            for f in range(0, frames - chunk + 1, chunk):
                start = time.perf_counter()
                _, state = codec.decode_step(codes[..., f: f + chunk], state)
                per_step.append(time.perf_counter() - start)
        if chunk == 1:
            median_ms = 1000 * statistics.median(per_step)
            p95_ms = 1000 * float(np.percentile(per_step, 95))
        chunked[f"stream_decode_x_realtime_{chunk}_frames_per_step"] = round(
            chunk * frame_ms / (1000 * statistics.median(per_step)), 1)
    batched: dict[str, float] = {}
    for sessions in (16, 64):  # the server decodes every live session's frame in one step
        state = codec.init_decoder_state(sessions)
        frame = codes[..., :1].expand(sessions, -1, -1).contiguous()
        step_s = _median_seconds(lambda: codec.decode_step(frame, state), repeats * 4)
        batched[f"stream_decode_x_realtime_per_session_batch_{sessions}"] = round(frame_ms / (1000 * step_s / sessions), 1)
    onnx = _onnx_stream_decode(codec, codes, frames, repeats, frame_ms, median_ms)  # models/codec_onnx.py
    return {
        "kind": codec.kind,
        "bitrate_bps": codec.bitrate(),
        "threads": threads,
        "encode_x_realtime": round(seconds / encode_s, 1),
        "decode_x_realtime": round(seconds / decode_s, 1),
        "stream_decode_frame_ms_median": round(median_ms, 3),
        "stream_decode_frame_ms_p95": round(p95_ms, 3),
        "stream_decode_x_realtime": round(frame_ms / median_ms, 1),
        **chunked,
        **batched,
        **onnx,
        "stream_vs_whole_decode_cost_ratio": round(median_ms / whole_per_frame_ms, 2),
    }


def _onnx_stream_decode(codec: Codec, codes: torch.Tensor, frames: int, repeats: int, frame_ms: float,
                        torch_median_ms: float) -> dict:
    """Per-frame streaming decode on ONNX Runtime at batch 1, and per session at 16 and 64.

    The headline figures use the bound state (`step_bound`: buffers bound to the session once, as
    a live stream would); `onnx_numpy_state_stream_decode_x_realtime` is the functional `step`
    (a dict of arrays in, new arrays out) on the same graph, to show what the per-call binding costs.
    """
    from models.codec_onnx import OnnxStreamingDecoder

    decoder = OnnxStreamingDecoder(codec, batch=1, threads=torch.get_num_threads())
    numpy_codes = codes.numpy()
    bound: list[float] = []
    functional: list[float] = []
    for _ in range(repeats):
        state = decoder.init_bound_state(1)
        for f in range(frames):
            start = time.perf_counter()
            decoder.step_bound(numpy_codes[..., f: f + 1], state)
            bound.append(time.perf_counter() - start)
        arrays = decoder.init_state(1)
        for f in range(frames):
            start = time.perf_counter()
            _, arrays = decoder.step(numpy_codes[..., f: f + 1], arrays)
            functional.append(time.perf_counter() - start)
    median_ms = 1000 * statistics.median(bound)
    figures = {"onnx_stream_decode_frame_ms_median": round(median_ms, 3),
               "onnx_stream_decode_frame_ms_p95": round(1000 * float(np.percentile(bound, 95)), 3),
               "onnx_stream_decode_x_realtime": round(frame_ms / median_ms, 1),
               "onnx_vs_torch_stream_decode_speedup": round(torch_median_ms / median_ms, 2),
               "onnx_numpy_state_stream_decode_x_realtime": round(frame_ms / (1000 * statistics.median(functional)), 1)}
    decoder = OnnxStreamingDecoder(codec, batch=None, threads=torch.get_num_threads())
    for sessions in (16, 64):
        state = decoder.init_bound_state(sessions)
        frame = np.ascontiguousarray(np.broadcast_to(numpy_codes[..., :1], (sessions, *numpy_codes.shape[1:2], 1)))
        step_s = _median_seconds(lambda: decoder.step_bound(frame, state), repeats * 4)
        figures[f"onnx_stream_decode_x_realtime_per_session_batch_{sessions}"] = round(
            frame_ms / (1000 * step_s / sessions), 1)
    return figures


def trained_s2s(params: Params) -> tuple[S2STransformer, str]:
    checkpoint = params.path(params.s2s_train.out_dir) / "last.pt"
    if checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        model = S2STransformer(S2SConfig(**state["config"]))
        model.load_state_dict(state["model"])
        return model.eval(), str(checkpoint.relative_to(params.root))
    codec = params.codec
    # an untrained text stream gets the Telugu Unicode block as its characters (an aligner's are ~60 of them)
    symbols = "".join(map(chr, range(0x0C00, 0x0C80))) if params.s2s.text_stream else ""
    config = S2SConfig(n_codebooks=codec.n_codebooks, codebook_size=codec.codebook_size, **params.s2s.model_dump(),
                       text_symbols=symbols)
    return S2STransformer(config).eval(), "untrained (params.yaml)"


@torch.inference_mode()
def _no_cache_frames(model: S2STransformer, user: torch.Tensor, speaker: torch.Tensor, emotion: torch.Tensor,
                     steps: int) -> None:
    """Baseline: greedy steps that recompute the whole sequence every time (no KV cache)."""
    config = model.config
    body = prompt_tokens(user, config)
    for _ in range(steps):
        logits = model(body, speaker, emotion)[..., -1, : config.codebook_size]
        body = torch.cat([body, logits.argmax(-1, keepdim=True)], dim=-1)


def previous_s2s(params: Params) -> S2STransformer:
    """The S2S model as it last shipped (4 x 256 codes, conditioning at one slot, no text stream,
    the smoke shape): the baseline of the cost ratios. Untrained weights cost the same."""
    shape = params.s2s.model_dump(exclude={"conditioning", "text_stream"})
    return S2STransformer(S2SConfig(n_codebooks=4, codebook_size=256, **shape)).eval()


@torch.inference_mode()
def bench_s2s(params: Params, user_frames: int = 150, reply_frames: int = 100, repeats: int = 3,
              threads: int = 1) -> dict:
    """Generation speed of the trained model, and of the previous model (v1's tokens) measured in
    this run, with `*_vs_previous` ratios of frames per second (> 1: the new model is faster)."""
    torch.set_num_threads(threads)
    model, source = trained_s2s(params)
    config = model.config
    report: dict = {"model": source, "parameters": model.num_parameters(), "threads": threads,
                    **_generation_speed(model, user_frames, reply_frames, repeats)}
    previous = _generation_speed(previous_s2s(params), user_frames, reply_frames, repeats)
    report |= {f"previous_{k}": v for k, v in previous.items()}
    for batch in (1, 64):
        report[f"batch{batch}_frames_per_s_vs_previous"] = round(
            report[f"batch{batch}_frames_per_s"] / previous[f"batch{batch}_frames_per_s"], 2)
    user = torch.randint(config.codebook_size, (1, config.n_codebooks, user_frames))
    zero = torch.zeros(1, dtype=torch.long)
    steps = 20
    cached = _median_seconds(lambda: list(model.generate(user, zero, zero, max_frames=steps, temperature=0)), repeats)
    uncached = _median_seconds(lambda: _no_cache_frames(model, user, zero, zero, steps), repeats)
    report["kv_cache_speedup_batch1"] = round(uncached / cached, 2)
    report["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return report


def _generation_speed(model: S2STransformer, user_frames: int, reply_frames: int, repeats: int) -> dict:
    """Reply frames per second (and codebook tokens per second) at batch 1 and 64, and the time to
    the first frame, sampling at temperature 1, top-k 50 (medians over `repeats`)."""
    config, report = model.config, {}
    for batch in (1, 64):
        user = torch.randint(config.codebook_size, (batch, config.n_codebooks, user_frames))
        speaker, emotion = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long)
        firsts, totals = [], []
        for r in range(repeats):
            generator = torch.Generator().manual_seed(r)
            start = time.perf_counter()
            stream = model.generate(user, speaker, emotion, max_frames=reply_frames, temperature=1.0, top_k=50,
                                    generator=generator, min_frames=reply_frames)
            n = 0
            for n, _ in enumerate(stream, 1):
                if n == 1:
                    firsts.append(time.perf_counter() - start)
            totals.append((n, time.perf_counter() - start))
        frames = max(n for n, _ in totals)
        seconds = statistics.median(t for _, t in totals)
        report[f"batch{batch}_frames_per_s"] = round(batch * frames / seconds, 1)
        report[f"batch{batch}_tokens_per_s"] = round(batch * frames * config.n_codebooks / seconds, 1)
        report[f"batch{batch}_first_frame_ms"] = round(1000 * statistics.median(firsts), 1)
        report[f"batch{batch}_frames_generated"] = frames
    return report
