"""/metrics as Prometheus scrapes it: the process collectors, the model served, first-audio
buckets into seconds, the engine's tick, queue and heartbeat, and playback gaps counted from the
times the server sent each frame (a real server on loopback, parsed with prometheus_client's own
text parser)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import websockets
from prometheus_client.parser import text_string_to_metric_families

from serving.app import GAP_TOLERANCE_S, PlayoutClock, model_labels
from serving.bundle import bundle_sha

from .conftest import speak
from .live_server import LiveServer
from .test_serving import one_turn


def _samples(text: str) -> dict[str, list]:
    """metric family name -> its samples (name, labels, value)."""
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_metrics_name_the_model_and_show_process_engine_and_latency_figures(bundle_dir: Path, one_thread):
    settings = {"max_reply_seconds": 0.4, "min_reply_seconds": 0.1, "temperature": 0.0}
    speech = speak("నమస్కారం, మీరు ఎలా ఉన్నారు?")

    async def conversation(url: str) -> None:
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "protocol": 1, "sample_rate": 16000}))
            await ws.recv()
            await one_turn(ws, speech)

    with LiveServer(bundle_dir, settings) as server:
        asyncio.run(conversation(server.url))
        status, text = server.text("/metrics")
    assert status == 200
    families = _samples(text)
    # the process collectors: memory and CPU for the memory alert and dashboards
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_max_fds", "python_info"):
        assert name in families, name
    assert families["process_resident_memory_bytes"][0].value > 1e6
    # which model serves: name, version, the registry's bundle_sha tag, and where it came from
    (info,) = families["s2s_model_info"]
    assert info.name == "s2s_model_info" and info.value == 1.0
    assert info.labels["bundle_sha"] == bundle_sha(bundle_dir) and info.labels["name"] == "tiny"
    assert info.labels["uri"] == str(bundle_dir)
    # first audio: one observation, in buckets that reach into seconds
    buckets = {float(s.labels["le"]): s.value for s in families["s2s_first_audio_seconds"]
               if s.name.endswith("_bucket")}
    assert max(b for b in buckets if b != float("inf")) >= 10.0 and {1.0, 2.5, 5.0} <= set(buckets)
    assert buckets[float("inf")] == 1.0
    # the engine: ticks timed, the queue read at the scrape, alive and recently looping
    ticks = {s.name: s.value for s in families["s2s_engine_tick_seconds"]}
    assert ticks["s2s_engine_tick_seconds_count"] > 0
    assert families["s2s_engine_queue_depth"][0].value >= 0
    assert families["s2s_engine_alive"][0].value == 1.0
    assert 0 <= families["s2s_engine_heartbeat_age_seconds"][0].value < 5
    assert families["s2s_memory_limit_bytes"][0].value > families["process_resident_memory_bytes"][0].value
    # playback gaps are counted (a tiny model on a quiet loop keeps ahead of real time)
    assert "s2s_replies_with_gaps" in families and "s2s_playback_gap_seconds" in families


def test_the_playout_clock_counts_only_what_a_real_time_player_would_miss():
    clock = PlayoutClock()
    for i in range(10):  # 20 ms frames sent 10 ms apart: always ahead
        clock.sent(100.0 + i * 0.01, 0.02)
    assert clock.starved_s == 0.0
    clock = PlayoutClock()
    clock.sent(0.0, 0.02)          # plays 0.00-0.02
    clock.sent(0.1, 0.02)          # arrives 80 ms after the player ran dry
    clock.sent(0.12, 0.02)         # back on time against the shifted schedule
    assert abs(clock.starved_s - 0.08) < 1e-9 and clock.starved_s > GAP_TOLERANCE_S


def test_model_labels_from_a_registry_uri_and_from_bundle_metadata():
    meta = {"model_name": "telugu-s2s", "sha256": {"codec.pt": "a", "s2s.pt": "b"}}
    labels = model_labels(meta, "models:/telugu-s2s/7")
    assert labels["name"] == "telugu-s2s" and labels["version"] == "7" and len(labels["bundle_sha"]) == 32
    assert model_labels({}, "models:/telugu-s2s@champion")["version"] == "champion"
    # `s2s serve` resolves the alias to the version number when it loads from the registry
    assert model_labels({"registered_version": "3"}, "models:/telugu-s2s@champion")["version"] == "3"
    assert model_labels({}, "")["name"] == "unknown"


def test_the_memory_limit_is_the_cgroup_limit_else_the_machine_memory(tmp_path: Path):
    from serving.host import memory_limit_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree: 1 kB\n")
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    assert memory_limit_bytes((v2, v1), meminfo) == 16384 * 1024       # no cgroup files
    v2.write_text("max\n")
    v1.write_text("9223372036854771712\n")                                # v1's "no limit"
    assert memory_limit_bytes((v2, v1), meminfo) == 16384 * 1024
    v2.write_text("1048576\n")
    assert memory_limit_bytes((v2, v1), meminfo) == 1048576.0
