"""Inference cost from the measured capacity, the comparison with published peers, and the
executive summary: fast checks on known figures (the flows' own reports are checked in
tests/test_train_flow.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import load_params
from tasks.release.comparison import NOT_PUBLISHED, ROWS, comparison_section, load_peers
from tasks.release.executive_summary import render_summary
from tasks.release.inference_cost import Capacity, capacity_from_report, inference_cost, measured_capacity

REPORT = {  # the shape `s2s loadtest --json` writes
    "meta": {"started": "2026-11-26 00:30 UTC", "machine": {"cores": 2}},
    "runs": [
        {"clients": 1, "batching": True, "errors": 0, "dropped": 0, "latency_ms": {"p50": 28.3, "p95": 31.2}},
        {"clients": 10, "batching": True, "errors": 0, "dropped": 0, "latency_ms": {"p50": 83.4, "p95": 99.0}},
        {"clients": 50, "batching": True, "errors": 0, "dropped": 0, "latency_ms": {"p50": 299.7, "p95": 1145.0}},
        {"clients": 100, "batching": True, "errors": 0, "dropped": 0, "latency_ms": {"p50": 592.6, "p95": 4245.6}},
        {"clients": 100, "batching": False, "errors": 0, "dropped": 69, "latency_ms": {"p50": 4582.3, "p95": 7204.2}},
    ],
}


def test_capacity_is_the_largest_count_within_the_target_with_no_errors():
    capacity = capacity_from_report(REPORT, 300.0, "artifacts/loadtest.json")
    assert capacity.sessions == 10 and capacity.cores == 2 and capacity.sessions_per_core == 5.0
    assert capacity.first_audio_ms[100] == {"p50": 592.6, "p95": 4245.6}, "the batching-off run is not the capacity"
    assert "2026-11-26" in capacity.source and "artifacts/loadtest.json" in capacity.source
    failing = {**REPORT, "runs": [{**REPORT["runs"][1], "errors": 3}]}
    assert capacity_from_report(failing, 300.0, "x").sessions == 0
    searched = {**REPORT, "capacity": {"sessions": 7, "sessions_per_core": 3.5, "cores": 2}}
    strict = capacity_from_report(searched, 300.0, "x")  # the search also refuses playback gaps
    assert (strict.sessions, strict.cores) == (7, 2) and "capacity search" in strict.source


def test_cost_per_hour_day_month_and_user_hour_at_the_stated_load(project_root: Path):
    params = load_params("smoke", {"inference_cost": {"core_hour_usd": 0.05, "load_sessions": 100}})
    cost = inference_cost(params, Capacity(10, 2, "test"))
    assert cost["servers"] == 10 and cost["cores"] == 20
    assert cost["usd_per_hour"] == pytest.approx(1.0) and cost["usd_per_day"] == pytest.approx(24.0)
    assert cost["usd_per_month"] == pytest.approx(730.0)
    assert cost["usd_per_user_hour"] == pytest.approx(0.01) and cost["usd_per_user_hour_full"] == pytest.approx(0.01)
    assert inference_cost(params, Capacity(0, 2, "nothing fit")) is None
    # no load test file: the fallback figures, with their source
    fallback = measured_capacity(params)
    assert fallback.source.startswith("params.yaml inference_cost.fallback: docs/benchmarks.md")
    assert fallback.sessions == 10 and fallback.first_audio_ms[1]["p95"] == 31.2
    # the latest load test wins when there is one; a broken one is refused by name
    (project_root / "artifacts").mkdir()
    (project_root / "artifacts" / "loadtest.json").write_text(json.dumps(REPORT))
    params = load_params("smoke")
    assert measured_capacity(params).source.startswith("artifacts/loadtest.json (s2s loadtest of 2026-11-26")
    (project_root / "artifacts" / "loadtest.json").write_text(json.dumps({"runs": [{"clients": "x"}]}))
    with pytest.raises(ValueError, match="not an `s2s loadtest` report"):
        measured_capacity(params)


def test_every_peer_figure_cites_a_dated_source_and_missing_ones_say_not_published():
    peers = load_peers()
    assert set(peers["peers"]) == {"Kyutai Moshi", "Pixa Luna (claims)", "GPT-4o voice", "LLaMA-Omni"}
    for source in peers["sources"].values():
        assert source["url"].startswith("https://") and source["date"] and source["title"]
    figures = {"quality.replies.speakers_working": 4.0, "quality.replies.emotions_working": 0.0,
               "quality.replies.intelligibility": 0.406, "quality.replies.dnsmos_p808": 2.57, "cost.total_usd": 0.05}
    quality = {"sets": {"corpus": {"dnsmos_p808": 2.89}}}
    capacity = Capacity(10, 2, "test load", {1: {"p50": 28.3, "p95": 31.2}, 100: {"p50": 592.6, "p95": 4245.6}})
    lines = comparison_section(figures.get, quality, capacity, {"usd_per_user_hour_full": 0.01})
    text = "\n".join(lines)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    assert len([r for r in rows if r in dict(ROWS).values()]) == len(ROWS)
    first = rows["first audio, 1 session (p50 / p95)"]
    assert "28 / 31 ms" in first and "232 ms at best, 320 ms on average [" in first
    assert "lower than every published figure, but not the same test" in first
    load_row = rows["first audio, 100 sessions (p50 / p95)"]
    assert "593 / 4246 ms" in load_row and load_row.count(NOT_PUBLISHED) == 4
    assert "no peer published this figure" in load_row
    assert "| 0 of 9 |" in rows["emotions working"] and "2.57 / 2.89" in rows["MOS (DNSMOS P.808) of replies / of its training corpus"]
    # every [n] in the table is a listed source with its date
    cited = {int(n) for n in __import__("re").findall(r"\[(\d+)\]", text)}
    sources = text.split("Sources:")[1]
    for n in cited:
        assert f"\n{n}. " in sources
    assert "https://arxiv.org/abs/2410.00037" in sources and "2024-05-13" in sources


def test_the_executive_summary_counts_targets_names_risks_and_missing_approvals(project_root: Path):
    params = load_params("smoke", {"registry": {"required_roles": ["technical_lead", "business_head"]}})
    info = {"name": "telugu-s2s", "version": "4", "aliases": ["champion"], "run_id": "r",
            "tags": {"profile": "smoke", "signoff.technical_lead": "Lakshmi", "signoff.technical_lead.at": "2026-11-30"},
            "evaluation": {"metrics": {"latency": {"first_audio_mean_ms": 34.6, "first_audio_std_ms": 4.4},
                                       "quality": {"replies.dnsmos_p808": 2.57}, "cost": {"total_usd": 0.05}},
                           "quality": {"sets": {"corpus": {"dnsmos_p808": 2.89}}}}}
    capacity = Capacity(10, 2, "test load", {100: {"p50": 592.6, "p95": 4245.6}})
    text = render_summary(info, params, capacity, today="2026-11-30")
    assert text.startswith("# Executive summary: telugu-s2s version 4")
    assert "| Latency mean < 150 ms | <= 150 | 34.6 | ✅ meets |" in text
    assert "**MOS > 4.0** is missed: 2.57 against a target of >= 4." in text
    assert "At 100 concurrent sessions the p95 first audio is 4246 ms" in text
    assert "Still missing: business_head" in text and "technical_lead: Lakshmi" in text
    assert "Training this version: $0.05." in text and "10 servers of 2 cores" in text
