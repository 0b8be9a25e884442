"""The serving engine and the WebSocket app: batched replies equal one-by-one replies, a full turn
over /ws, server-side end of utterance, voice changes, stats and metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import websockets

from serving.bundle import load_bundle
from serving.engine import Engine, ReplyEvent
from serving.session import GenerationSettings, ReplySession
from tasks.benchmarks.server_launcher import free_port

from .conftest import run_engine, speak
from .live_server import LiveServer

GREEDY = GenerationSettings(temperature=0.0, top_k=None, max_reply_seconds=0.5, min_reply_seconds=0.1)


@pytest.mark.parametrize("kind", ["bundle_dir", "v1_bundle_dir"])
def test_batched_replies_equal_one_by_one_replies(kind: str, request: pytest.FixtureRequest, one_thread):
    bundle = load_bundle(request.getfixturevalue(kind))   # the shipped kind, and the previous one
    utterances = [speak(t) for t in ("నమస్కారం.", "మీరు ఎలా ఉన్నారు?", "సాయంత్రం ఐదు గంటలకు వస్తుంది.",
                                        "అవును.", "నేను అన్నం, పప్పు తిన్నాను.")]
    expected = [ReplySession(bundle, "male_mature", "thinking", GREEDY).reply(u) for u in utterances]
    for batching in (True, False):
        engine = Engine(bundle, GREEDY, max_sessions=8, batching=batching).start()
        try:
            for stagger in (False, True):
                replies = run_engine(engine, utterances, stagger)
                for got, want in zip(replies, expected):
                    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
        finally:
            engine.stop()
        if batching:
            assert max(engine.batch_sizes) > 1, "live replies were stepped together"
        else:
            assert set(engine.batch_sizes) == {1}


@pytest.mark.parametrize("conditioning", ["slot", "every_step"])
def test_slot_rows_move_without_changing_their_continuation(one_thread, conditioning: str):
    from models.s2s_transformer import S2SConfig, S2STransformer

    torch.manual_seed(0)
    model = S2STransformer(S2SConfig(n_codebooks=2, codebook_size=16, d_model=16, n_layers=1, n_heads=2,
                                     max_len=64, conditioning=conditioning)).eval()
    cache = model.init_slots(3)
    hidden = [model.prefill_row(cache, row, torch.randint(16, (1, 2, 4 + row)), torch.tensor([row]),
                                torch.tensor([row])) for row in range(3)]
    tokens = torch.randint(16, (3, 2, 1))
    with torch.inference_mode():
        reference = model.step_rows(cache, slice(0, 3), tokens)
    cache.lengths -= 1  # undo the step, then move row 2 into row 0 and step it alone
    cache.move_row(2, 0)
    with torch.inference_mode():
        moved = model.step_rows(cache, slice(0, 1), tokens[2:3])
    assert torch.allclose(moved, reference[2:3], atol=1e-5) and len(hidden) == 3


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def one_turn(ws, audio: np.ndarray, end_by_client: bool = True) -> tuple[int, list[dict]]:
    for start in range(0, len(audio), 320):
        await ws.send(pcm16(audio[start: start + 320]))
    if end_by_client:
        await ws.send(json.dumps({"type": "end_of_utterance"}))
    samples, controls = 0, []
    while True:
        message = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(message, bytes):
            samples += len(message) // 2
            continue
        controls.append(json.loads(message))
        if controls[-1]["type"] in ("reply_end", "error"):
            return samples, controls


def test_a_full_turn_over_the_websocket_with_stats_and_metrics(bundle_dir: Path, one_thread):
    settings = {"max_reply_seconds": 0.4, "min_reply_seconds": 0.1, "temperature": 0.0}
    speech = speak("ఈ రోజు వాతావరణం చాలా బాగుంది కదా?")

    async def conversation(url: str) -> list:
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "protocol": 1, "speaker": "female_young",
                                      "emotion": "happy", "sample_rate": 16000}))
            ready = json.loads(await ws.recv())
            first = await one_turn(ws, speech)
            await ws.send(json.dumps({"type": "voice", "speaker": "male_young", "emotion": "surprise"}))
            voice = json.loads(await ws.recv())
            second = await one_turn(ws, speech)
            await ws.send(json.dumps({"type": "stop"}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return [ready, first, voice, second, closed.value.rcvd.code]

    with LiveServer(bundle_dir, settings) as server:
        ready, first, voice, second, code = asyncio.run(conversation(server.url))
        status, stats = server.get("/stats")
        _, metrics = server.text("/metrics")
        _, health = server.get("/healthz")
    assert ready["type"] == "ready" and ready["sample_rate"] == 16000 and ready["frame_samples"] == 320
    for samples, controls in (first, second):
        assert [c["type"] for c in controls] == ["end_of_utterance", "reply_end"]
        metrics_of_turn = controls[-1]["metrics"]
        assert samples == metrics_of_turn["frames"] * 320 and 0.1 <= samples / 16000 <= 0.4
        assert metrics_of_turn["first_audio_ms"] > 0
    assert voice == {"type": "voice", "speaker": "male_young", "emotion": "surprise"}
    assert code == 1000
    assert status == 200 and stats["replies_total"] == 2 and stats["first_audio_latency_ms"]["count"] == 2
    assert stats["sessions"] == 0 and stats["errors_total"] == 0
    assert "s2s_first_audio_seconds_count 2.0" in metrics and "s2s_replies_total 2.0" in metrics
    assert health["status"] == "ok"


def test_the_server_vad_ends_the_utterance(bundle_dir: Path, one_thread):
    speech = np.concatenate([speak("నమస్కారం, మీరు ఎలా ఉన్నారు?"), np.zeros(16000, dtype=np.float32)])

    async def talk(url: str):
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "speaker": "male_mature", "emotion": "empathy",
                                      "sample_rate": 16000, "vad": "server"}))
            await ws.recv()
            return await one_turn(ws, speech, end_by_client=False)

    with LiveServer(bundle_dir, {"max_reply_seconds": 0.3, "vad_silence_ms": 500}) as server:
        samples, controls = asyncio.run(talk(server.url))
    assert controls[0] == {"type": "end_of_utterance", "source": "server"}
    assert controls[-1]["type"] == "reply_end" and samples > 0


def test_shutdown_lets_the_reply_in_flight_finish(bundle_dir: Path, tmp_path: Path, project_root: Path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "s2s.cli", "serve", "--model", str(bundle_dir), "--port",
                               str(port), "--set=serving.max_reply_seconds=3.0", "--set=serving.min_reply_seconds=3.0",
                               "--set=serving.shutdown_grace_s=20"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)

        async def talk() -> tuple[int, list[dict], int]:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
                await ws.recv()
                await ws.send(pcm16(speak("నమస్కారం.")))
                await ws.send(json.dumps({"type": "end_of_utterance"}))
                samples, kinds = 0, []
                while True:
                    try:
                        message = await asyncio.wait_for(ws.recv(), 30)
                    except websockets.ConnectionClosed as closed:
                        return samples, kinds, closed.rcvd.code
                    if isinstance(message, bytes):
                        if samples == 0:
                            server.send_signal(signal.SIGTERM)  # mid-reply
                        samples += len(message) // 2
                    else:
                        kinds.append(json.loads(message))

        samples, controls, code = asyncio.run(talk())
        # min_reply_seconds 3: no early end; the tiny model's context caps the reply at 62 frames
        assert controls[-1]["type"] == "reply_end" and samples == controls[-1]["metrics"]["frames"] * 320 >= 16000, \
            "the reply in flight was finished"
        assert code == 1001
        assert server.wait(30) in (0, -signal.SIGTERM), "uvicorn exits by re-raising the signal it drained on"
    finally:
        if server.poll() is None:
            server.kill()
