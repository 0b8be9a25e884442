"""Segmentation and quality checks on espeak-ng Telugu with known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torchaudio.functional as AF

from core.config import load_params
from tasks.benchmarks.bench_segment import score
from tasks.data.normalize import frame_levels
from tasks.data.segment import LabelledRegion, merge_regions, segment_audio, split_long
from tasks.data.segment_checks import CorpusValidationError, check_quality
from tasks.data.sources import Source
from tasks.data.synth_corpus import EpisodePlan, Exchange, render_episode

from .conftest import REPO

EXCHANGES = (
    Exchange("t1", "weather", "ఈ రోజు వాతావరణం చాలా బాగుంది కదా?", "అవును, చల్లని గాలి వీస్తోంది, బయటికి వెళ్దాం."),
    Exchange("t2", "food", "నువ్వు ఈ రోజు ఏమి తిన్నావు?", "నేను అన్నం, పప్పు, ఆవకాయ తిన్నాను."),
    Exchange("t3", "travel", "మన ఊరికి బస్సు ఎప్పుడు వస్తుంది?", "సాయంత్రం ఐదు గంటలకు వస్తుంది అనుకుంటా."),
    Exchange("t4", "school", "పిల్లలు బడికి వెళ్ళారా?", "వెళ్ళారు, ఈ రోజు వాళ్ళకి పరీక్ష ఉంది."),
)


@pytest.fixture(scope="module")
def params():
    return load_params("smoke", root=REPO)


def episode(params, snr_db: float, speakers=("male_mature", "female_young"), defect=None):
    plan = EpisodePlan("t", speakers, "neutral", EXCHANGES, snr_db, "wav", defect)
    mix, turns = render_episode(plan, params)
    levels = frame_levels(mix, 22050)
    audio = AF.resample(torch.from_numpy(mix), 22050, 16000).numpy()
    gain = 10 ** ((-23 - float(AF.loudness(torch.from_numpy(audio)[None], 16000))) / 20)
    return np.clip(audio * gain, -1, 1).astype(np.float32), levels, turns


@pytest.mark.parametrize("snr_db", [30.0, 20.0, 12.0])
def test_segments_match_truth_and_snr_is_estimated(params, snr_db):
    audio, levels, turns = episode(params, snr_db)
    source = Source(id="t", url="file:///t", licence="test", speakers=("male_mature", "female_young"))
    rows = segment_audio(audio, levels, source, "t", params.segment)
    s = score(turns, rows)
    errors = np.array(s["boundary_errors_s"])
    assert s["turns_found"] == len(turns)
    assert np.median(errors) < 0.15, f"median boundary error {np.median(errors):.3f} s"
    assert s["pure_s"] / s["speech_s"] > 0.97 and s["named_s"] / s["speech_s"] > 0.97
    estimated = np.median([r["snr_db"] for r in rows])
    assert abs(estimated - snr_db) < 4.0, f"SNR {snr_db} dB estimated as {estimated:.1f} dB"
    assert all(1.0 <= r["duration_s"] <= 15.0 for r in rows)


def test_speakers_named_by_pitch_rule_without_metadata(params):
    audio, levels, turns = episode(params, 30.0, speakers=("male_mature", "female_young"))
    rows = segment_audio(audio, levels, Source(id="t", url="file:///t", licence="x"), "t", params.segment)
    assert len({r["speaker_label"] for r in rows}) == 2, "two speakers found without being told"
    s = score(turns, rows)
    assert s["named_s"] / s["speech_s"] > 0.9, "a low male and a high female voice named by the pitch rule"


def test_merge_and_split_rules():
    regions = [LabelledRegion(0, 2, 0), LabelledRegion(2.2, 4, 0), LabelledRegion(4.1, 6, 1)]
    assert merge_regions(regions, 0.35) == [LabelledRegion(0, 4, 0), LabelledRegion(4.1, 6, 1)]
    probs = np.ones(1000, np.float32)
    probs[300] = 0.0  # a pause 9.6 s in
    parts = split_long(LabelledRegion(0.0, 22.0, 0), probs, 15.0, 1.0)
    assert len(parts) == 2 and abs(parts[0].end - 9.616) < 0.05 and all(p.end - p.start <= 15 for p in parts)


def test_quality_quarantines_each_bad_kind_with_its_reason(params):
    base = {"recording_id": "r", "source_id": "s", "speaker": "male_young", "emotion": "happy", "start": 0.0,
            "end": 2.0, "speaker_label": "spk0", "dbfs": -23.0}
    good = dict(duration_s=2.0, raw_dbfs=-20.0, snr_db=30.0, clipping_ratio=0.0, silence_ratio=0.1)
    rows = [
        {**base, **good, "segment_id": "ok"},
        {**base, **good, "segment_id": "short", "duration_s": 0.4},
        {**base, **good, "segment_id": "quiet", "raw_dbfs": -61.0},
        {**base, **good, "segment_id": "noisy", "snr_db": 3.0},
        {**base, **good, "segment_id": "clipped", "clipping_ratio": 0.12},
        {**base, **good, "segment_id": "silent", "silence_ratio": 0.9},
    ]
    result = check_quality(pd.DataFrame(rows), params.quality, params.segment)
    assert list(result.kept["segment_id"]) == ["ok"]
    reasons = dict(zip(result.quarantined["segment_id"], result.quarantined["reason"]))
    assert reasons["short"] == "duration_s 0.4 outside [1.0, 15.0]"
    assert reasons["quiet"] == "raw_dbfs -61 below -45.0"
    assert reasons["noisy"] == "snr_db 3 below 10.0"
    assert reasons["clipped"] == "clipping_ratio 0.12 above 0.002"
    assert reasons["silent"] == "silence_ratio 0.9 above 0.5"
    assert result.report["segment_quality"]["success"] is False

    with pytest.raises(CorpusValidationError, match="speaker"):
        check_quality(pd.DataFrame([{**base, **good, "segment_id": "x", "speaker": "robot"}]),
                      params.quality, params.segment)
