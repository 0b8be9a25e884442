"""The model benchmarks run end to end on tiny models and report sane figures."""

from __future__ import annotations

from core.config import load_params

from .conftest import TINY


def test_bench_codec_and_s2s_report_figures(project_root):
    from tasks.benchmarks.bench_models import bench_codec, bench_s2s

    params = load_params("smoke", TINY)
    codec = bench_codec(params, seconds=1.0, frames=10, repeats=1)
    assert codec["model"].startswith("untrained") and codec["bitrate_bps"] == 50 * 2 * 5
    assert codec["encode_x_realtime"] > 0 and codec["stream_decode_frame_ms_median"] > 0
    assert codec["stream_decode_frame_ms_p95"] >= codec["stream_decode_frame_ms_median"]
    assert codec["stream_decode_x_realtime_per_session_batch_64"] > 0
    assert codec["kind"] == "mel" and codec["previous_kind"] == "conv"   # v2, against v1 in the same run
    assert codec["previous_bitrate_bps"] == 50 * 4 * 8
    assert codec["stream_decode_x_realtime_vs_previous"] == round(
        codec["stream_decode_x_realtime"] / codec["previous_stream_decode_x_realtime"], 2)
    # ONNX Runtime decode, both kinds (models/codec_onnx.py)
    assert codec["onnx_stream_decode_x_realtime"] > 0 and codec["onnx_vs_torch_stream_decode_speedup"] > 0
    assert codec["previous_onnx_stream_decode_x_realtime"] > 0 and codec["previous_onnx_vs_torch_stream_decode_speedup"] > 0
    assert codec["previous_onnx_stream_decode_frame_ms_p95"] >= codec["previous_onnx_stream_decode_frame_ms_median"]
    assert codec["previous_onnx_numpy_state_stream_decode_x_realtime"] > 0

    s2s = bench_s2s(params, user_frames=8, reply_frames=4, repeats=1)
    assert s2s["batch1_tokens_per_s"] > 0 and s2s["batch64_tokens_per_s"] > 0
    assert s2s["batch1_frames_generated"] == 4 and s2s["batch1_first_frame_ms"] > 0   # held to full length
    assert s2s["previous_batch64_frames_generated"] == 4 and s2s["previous_batch1_tokens_per_s"] > 0
    assert s2s["batch64_frames_per_s_vs_previous"] == round(
        s2s["batch64_frames_per_s"] / s2s["previous_batch64_frames_per_s"], 2)
    assert s2s["kv_cache_speedup_batch1"] > 0
