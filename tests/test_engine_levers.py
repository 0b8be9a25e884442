"""The engine's levers (docs/benchmarks.md): chunked encoding gives the same codes, deadline
scheduling and int8 keep the batched-equals-one-by-one contract, the scheduling rules row by row,
the tick profile, and what the load test counts as a playback gap, a think time and a capacity."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from serving.bundle import load_bundle
from serving.engine import Engine, ReplyEvent, RowStates, as_slice
from serving.precision import with_precision
from serving.schedule import due_slices
from serving.session import GenerationSettings, ReplySession
from tasks.benchmarks.capacity import next_probe, passes, search_capacity
from tasks.benchmarks.engine_profile import Setup, engine_profile_markdown, profile_engine
from tasks.benchmarks.playback import ThinkTime, playback_gap_s

from .conftest import run_engine, speak

GREEDY = GenerationSettings(temperature=0.0, top_k=None, max_reply_seconds=0.5, min_reply_seconds=0.1)
SENTENCES = ("నమస్కారం.", "మీరు ఎలా ఉన్నారు?", "సాయంత్రం ఐదు గంటలకు వస్తుంది.", "అవును.")


def _codes(engine: Engine, audio: np.ndarray, chunk: int) -> torch.Tensor:
    """The codes the engine holds for one conversation's audio posted in `chunk`-sample pieces."""
    cid = engine.open("male_young", "neutral", lambda event: None)
    with torch.inference_mode():
        for start in range(0, len(audio), chunk):
            engine.post_audio(cid, audio[start: start + chunk])
            engine.tick()
        engine.post_end(cid)  # the rest of the audio is encoded at end of utterance
        engine._apply_commands()
        engine._encode()
    return torch.cat(engine.conversations[cid].codes, dim=-1)[0]


@pytest.mark.parametrize("kind", ["bundle_dir", "v1_bundle_dir"])
def test_chunked_encoding_gives_the_same_codes(kind: str, request: pytest.FixtureRequest, one_thread):
    bundle = load_bundle(request.getfixturevalue(kind))
    audio = speak("మన ఊరికి బస్సు ఎప్పుడు వస్తుంది?")
    audio = audio[: len(audio) // bundle.codec.hop_length * bundle.codec.hop_length]
    with torch.inference_mode():
        whole = bundle.codec.encode(torch.from_numpy(audio)[None, None])[0]
    one_hop = _codes(Engine(bundle, GREEDY, max_sessions=2, encode_hops=1), audio, 320)
    for hops in (3, 4, 16):
        for chunk in (320, 480, 2000):  # as a client sends it: whole hops or not
            chunked = _codes(Engine(bundle, GREEDY, max_sessions=2, encode_hops=hops), audio, chunk)
            assert torch.equal(chunked, one_hop), (hops, chunk)
    assert torch.equal(one_hop, whole[:, : one_hop.shape[-1]]) and one_hop.shape[-1] == whole.shape[-1]


@pytest.mark.parametrize("kind", ["bundle_dir", "v1_bundle_dir"])
def test_levers_keep_batched_replies_equal_to_one_by_one(kind: str, request: pytest.FixtureRequest, one_thread):
    bundle = load_bundle(request.getfixturevalue(kind))
    utterances = [speak(t) for t in SENTENCES]
    expected = [ReplySession(bundle, "male_mature", "thinking", GREEDY).reply(u) for u in utterances]
    # ahead_ms 40: replies two frames ahead of playback wait, so rows step in changing slices
    engine = Engine(bundle, GREEDY, max_sessions=8, ahead_ms=40, encode_hops=4).start()
    try:
        for stagger in (False, True):
            for got, want in zip(run_engine(engine, utterances, stagger), expected):
                assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
    finally:
        engine.stop()
    profile = engine.profile.per_tick_ms()
    assert engine.profile.ticks > 0 and profile["total"] >= profile["step"] > 0 and profile["encode"] > 0


def test_a_reply_ahead_of_playback_waits(bundle_dir: Path, one_thread):
    """With deadline scheduling a reply is generated about as fast as it plays (plus the allowed
    lead), not as fast as the CPU can: the rest of the CPU goes to other sessions."""
    bundle = load_bundle(bundle_dir)
    settings = GenerationSettings(temperature=0.0, top_k=None, max_reply_seconds=1.0, min_reply_seconds=1.0)
    ahead_ms = 100
    times: list[float] = []
    ended = []
    engine = Engine(bundle, settings, max_sessions=2, ahead_ms=ahead_ms).start()
    try:
        cid = engine.open("male_young", "neutral",
                          lambda e: times.append(time.perf_counter()) if e.kind == "audio" else ended.append(e))
        engine.post_audio(cid, speak("అవును."))
        engine.post_end(cid)
        deadline = time.monotonic() + 60
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert ended and ended[0].kind == "end" and len(times) == 50
    # 1 s of reply, at most 100 ms (plus a tick) ahead of playback: it took most of a second to send
    assert times[-1] - times[0] >= 0.5


def test_due_slices():
    assert due_slices([]) == []
    assert due_slices([True] * 5) == [slice(0, 5)]
    assert due_slices([False] * 3) == []
    # runs a few waiting rows apart are stepped as one batch; far apart, as two
    assert due_slices([True, False, False, True, True], merge_gap=4) == [slice(0, 5)]
    assert due_slices([True] + [False] * 5 + [True], merge_gap=4) == [slice(0, 1), slice(6, 7)]
    assert due_slices([False, True, False, True], batching=False) == [slice(1, 2), slice(3, 4)]


def test_int8_keeps_the_encoder_and_quantizes_the_linear_layers(bundle_dir: Path, one_thread):
    bundle = load_bundle(bundle_dir)
    assert with_precision(bundle, "fp32") is bundle
    with pytest.raises(ValueError, match="one of fp32, int8"):
        with_precision(bundle, "int4")
    quantized = with_precision(bundle, "int8")
    assert not any(type(m) is nn.Linear for m in quantized.s2s.blocks.modules())
    assert all(type(m) is nn.Linear for m in quantized.s2s.heads)
    assert any(type(m) is nn.Linear for m in bundle.s2s.modules()), "the original bundle is untouched"
    assert type(quantized.codec.vocoder.head) is nn.Linear and quantized.meta["serving_precision"] == "int8"
    audio = torch.from_numpy(speak("అవును."))[None, None]
    with torch.inference_mode():
        assert torch.equal(quantized.codec.encode(audio), bundle.codec.encode(audio))
    utterances = [speak(t) for t in SENTENCES[:3]]
    expected = [ReplySession(quantized, "male_mature", "thinking", GREEDY).reply(u) for u in utterances]
    # dynamic quantization scales activations per batch: a reply depends a little on its batch-mates,
    # so batched equals one by one only approximately (serving/precision.py)
    engine = Engine(quantized, GREEDY, max_sessions=4).start()
    try:
        for got, want in zip(run_engine(engine, utterances, stagger=True), expected):
            assert got.shape == want.shape and np.allclose(got, want, atol=1e-3)
    finally:
        engine.stop()


def test_engine_profile_measures_each_setup(bundle_dir: Path, one_thread):
    bundle = load_bundle(bundle_dir)
    report = profile_engine(bundle, sessions=3, ticks=4, utterances=[speak("అవును.")],
                            setups=(Setup("baseline"), Setup("4 hops", encode_hops=4), Setup("int8", precision="int8")),
                            by_op=5)
    rows = report["setups"]
    assert [r["setup"] for r in rows] == ["baseline", "4 hops", "int8"] and rows[0]["ratio"] == 1.0
    for r in rows:
        assert r["rows_stepped_mean"] == 3 and r["total"] >= r["step"] > 0 and r["encode"] > 0 and r["decode"] > 0
        assert 0 < r["positions"][0] <= r["positions"][1]
    ops = report["ops"]  # the baseline by operator: the five with the most CPU time of their own
    assert len(ops) == 5 and all(op["op"] and op["calls"] > 0 for op in ops)
    assert [op["self_ms"] for op in ops] == sorted((op["self_ms"] for op in ops), reverse=True)
    text = engine_profile_markdown(report, "s2s bench engine")
    assert "## One engine tick at 3 sessions, by part" in text and "| baseline |" in text


@pytest.mark.parametrize("rows", [[2, 3, 4], [5], [1, 3, 4], [4, 2, 3]])
def test_row_states_read_a_run_of_rows_in_place_with_the_same_numbers(rows: list[int]):
    torch.manual_seed(0)
    state = [torch.randn(6, 3, 2), [torch.randn(6, 4)]]
    states, reference = RowStates([state[0].clone(), [state[1][0].clone()]]), state
    index = torch.tensor(rows)
    assert (as_slice(index) is not None) == (rows in ([2, 3, 4], [5]))
    part = states.gather(index)
    assert torch.equal(part[0], reference[0][index]) and torch.equal(part[1][0], reference[1][0][index])
    states.scatter(index, part)  # a state a step hands back unchanged (a conv that keeps no past)
    assert torch.equal(states.state[0], reference[0]) and torch.equal(states.state[1][0], reference[1][0])
    new = [part[0] * 2 + 1, [part[1][0] - 3]]  # a step's new state, in new tensors
    states.scatter(index, new)
    expected = [reference[0].index_copy(0, index, new[0]), reference[1][0].index_copy(0, index, new[1][0])]
    assert torch.equal(states.state[0], expected[0]) and torch.equal(states.state[1][0], expected[1])
    assert as_slice(torch.tensor([], dtype=torch.long)) is None


def test_playback_gaps():
    frame = 320  # 20 ms at 16 kHz
    steady = [(0.02 * k, frame) for k in range(10)]
    assert playback_gap_s(steady, 16000) == 0.0
    assert playback_gap_s([], 16000) == 0.0
    burst = [(1.0, frame)] * 10  # everything at once: plays without a gap
    assert playback_gap_s(burst, 16000) == 0.0
    late = [(0.0, frame), (0.1, frame), (0.12, frame)]  # the second frame 80 ms after the first ran out
    assert playback_gap_s(late, 16000) == pytest.approx(0.08)
    assert playback_gap_s(late, 16000, buffer_s=0.08) == 0.0, "a jitter buffer absorbs it"
    slow = [(0.04 * k, frame) for k in range(5)]  # half real time: 20 ms gap before every frame after the first
    assert playback_gap_s(slow, 16000) == pytest.approx(0.08)


def test_think_times_are_seeded_and_follow_the_stated_distribution():
    think = ThinkTime(median_s=1.5, sigma=0.6, max_s=8.0, seed=3)
    a = [think.draw(think.generator(7)) for _ in range(1)]
    assert a == [think.draw(think.generator(7))], "the same client draws the same times"
    rng = think.generator(0)
    draws = np.array([think.draw(rng) for _ in range(4000)])
    assert abs(np.median(draws) - 1.5) < 0.1 and draws.max() <= 8.0 and draws.min() > 0
    assert "median 1.5 s" in think.describe()
    with pytest.raises(ValueError):
        ThinkTime(median_s=0)


def _run(clients: int, p95: float, gaps: int = 0, dropped: int = 0) -> dict:
    return {"clients": clients, "errors": 0, "dropped": dropped, "turns_planned": 2 * clients,
            "turns_completed": 2 * clients - dropped, "latency_ms": {"p95": p95},
            "playback": {"with_gap": gaps, "replies": 2 * clients}}


def test_capacity_search():
    assert passes(_run(10, 120.0)) == (True, "")
    assert passes(_run(10, 320.0, gaps=2))[1] == "p95 320 ms; 2 replies with a gap"
    assert next_probe(0, None, 256) == 1 and next_probe(50, None, 256) == 100 and next_probe(256, None, 256) is None
    assert next_probe(50, 100, 256) == 75 and next_probe(100, 105, 256) is None
    # a server that holds 70 sessions: p95 grows with the count, gaps start above 70
    measured: list[int] = []

    async def measure(count: int) -> dict:
        measured.append(count)
        return _run(count, 2.0 * count, gaps=int(count > 70))

    known = [_run(1, 30.0), _run(10, 60.0), _run(50, 100.0), _run(100, 250.0, gaps=3)]
    result = asyncio.run(search_capacity(measure, known, probes=5, ceiling=256, cores=2))
    assert measured == [75, 62, 68, 71] and result["sessions"] == 68 and result["failed_at"] == 71
    assert result["sessions_per_core"] == 34.0
    assert [p["passed"] for p in result["probes"]] == [False, True, True, False]


def test_the_latency_gate_and_the_signoff_quote_the_recorded_capacity(tmp_path: Path):
    import json

    from core.config import LatencyGate
    from tasks.benchmarks.capacity import recorded_capacity
    from tasks.evaluation.gates import latency_gate
    from tasks.release.signoff import render_report

    assert recorded_capacity(tmp_path / "missing.json") is None
    (tmp_path / "loadtest.json").write_text(json.dumps({"capacity": {"sessions": 70, "sessions_per_core": 35.0,
                                                                     "cores": 2}}))
    figures = {"first_audio_mean_ms": 40.0, "first_audio_p95_ms": 60.0, "first_audio_std_ms": 5.0,
               **recorded_capacity(tmp_path / "loadtest.json")}
    quoted = latency_gate(figures, LatencyGate(max_mean_ms=150, max_p95_ms=300, max_std_ms=20))
    assert quoted.passed and [c.metric for c in quoted.checks] == ["first_audio_mean_ms", "first_audio_p95_ms",
                                                                  "first_audio_std_ms"]  # no floor: quoted only
    floor = LatencyGate(max_mean_ms=150, max_p95_ms=300, max_std_ms=20, min_capacity_sessions_per_core=30)
    gate = latency_gate(figures, floor)
    check = gate.checks[-1]
    assert gate.passed and check.metric == "capacity_sessions_per_core" and check.value == 35.0
    assert "70 sessions on 2 cores" in check.describe()
    assert not latency_gate(figures, floor.model_copy(update={"min_capacity_sessions_per_core": 50})).passed
    unmeasured = latency_gate(figures | {"capacity_sessions_per_core": None}, floor)
    assert not unmeasured.passed and "not measured" in unmeasured.checks[-1].describe()
    info = {"name": "telugu-s2s", "version": "3", "aliases": [], "run_id": "r", "tags": {},
            "evaluation": {"metrics": {"latency": figures}}}
    markdown = render_report(info, [])
    assert "| Capacity: 100 sessions on 2 cores | >= 50 | 35 | ❌ misses |" in markdown
