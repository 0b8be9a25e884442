"""Segment text from transcripts, the quality gate, control verdicts and the sign-off report's
quality section: fast checks on known cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.config import QualityGate
from core.labels import EMOTIONS, SPEAKERS
from tasks.data.sources import Source, SourcesError
from tasks.data.transcripts import attach_text, segment_text
from tasks.evaluation.gates import quality_gate
from tasks.evaluation.model_quality import (
    Clip,
    Judges,
    confusion,
    judge,
    per_label_recall,
    quality_markdown,
    working_labels,
)
from tasks.release.signoff import render_report
from tests.conftest import REPO, require_tool

TURNS = [{"start": 1.0, "end": 3.0, "text": "మొదటి"}, {"start": 3.5, "end": 5.0, "text": "రెండవ"},
         {"start": 8.0, "end": 12.0, "text": "మూడవ"}]


def test_a_segment_gets_the_turns_it_holds_and_none_when_it_cuts_one():
    assert segment_text(0.9, 3.1, TURNS) == "మొదటి"
    assert segment_text(0.9, 5.2, TURNS) == "మొదటి రెండవ"  # the segmenter merged two turns
    assert segment_text(8.0, 10.0, TURNS) == ""  # half a turn: no reference rather than a wrong one
    assert segment_text(5.5, 7.5, TURNS) == ""  # between turns: nothing said
    assert segment_text(2.95, 5.0, TURNS) == "రెండవ"  # a sliver of the previous turn is padding


def test_attach_text_reads_each_sources_transcript(tmp_path: Path):
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / "a.json").write_text(json.dumps({"turns": TURNS}), encoding="utf-8")
    sources = [Source(id="a", url="file:///a.wav", licence="x", transcript="truth/a.json"),
               Source(id="b", url="file:///b.wav", licence="x")]
    rows = [{"source_id": "a", "recording_id": "a", "start": 1.0, "end": 3.0},
            {"source_id": "b", "recording_id": "b", "start": 1.0, "end": 3.0}]
    out = attach_text(rows, sources, tmp_path / "sources.yaml")
    assert [r["text"] for r in out] == ["మొదటి", ""]
    broken = [Source(id="a", url="file:///a.wav", licence="x", transcript="truth/missing.json")]
    with pytest.raises(SourcesError, match="source a: transcript .*missing.json does not exist"):
        attach_text(rows[:1], broken, tmp_path / "sources.yaml")


class _FakeJudge:
    """Every judge at once: hears "అమ్మ", scores DNSMOS 2.0, recognises every clip as neutral."""

    def transcribe(self, clips):
        return ["అమ్మ"] * len(clips)

    def score(self, audio):
        return {"dnsmos_p808": 2.0}

    def predict(self, clips):
        return ["neutral"] * len(clips)


def _fake_judges() -> Judges:
    return Judges(_FakeJudge(), _FakeJudge(), _FakeJudge(), _FakeJudge())


def _report(control: float = 0.5) -> dict:
    """A quality report as evaluate_quality writes it: replies for 2 emotions and 2 speakers."""
    emotion = [[0] * len(EMOTIONS) for _ in EMOTIONS]
    emotion[0][0], emotion[0][1] = 3, 1  # neutral: 3 of 4 recognised
    emotion[1][0], emotion[1][1] = 3, 1  # happy: 1 of 4
    speaker = [[0] * len(SPEAKERS) for _ in SPEAKERS]
    speaker[0][0] = 4
    return {
        "sets": {"corpus": {"dnsmos_p808": 3.2, "cer": 0.08, "telugu_accuracy": 0.92, "emotion_accuracy": 0.9,
                            "speaker_accuracy": 1.0, "distillmos": 2.6},
                 "codec_roundtrip": {"dnsmos_p808": 2.5, "cer": 0.4, "telugu_accuracy": 0.6},
                 "replies": {"dnsmos_p808": 1.6, "dnsmos_p808_vs_corpus": 0.5, "cer": 0.95, "telugu_accuracy": 0.05,
                             "emotion_control": control, "speaker_control": 1.0, "emotions_working": 1.0,
                             "speakers_working": 1.0}},
        "confusion": {"replies": {"emotion": emotion, "speaker": speaker}},
        "labels": {"emotion": list(EMOTIONS), "speaker": list(SPEAKERS)}, "working_share": 0.5,
        "evaluators": {"runs": {"asr": "run-asr", "emotion": "run-emo", "speaker": "run-spk"}},
    }


def test_working_labels_come_from_the_requested_rows_of_the_confusion_matrix():
    report = _report()
    matrix = report["confusion"]["replies"]["emotion"]
    assert per_label_recall(matrix, EMOTIONS) == {"neutral": 0.75, "happy": 0.25}
    assert working_labels(matrix, EMOTIONS, 0.5) == ["neutral"]
    everything_empathy = [[0] * len(EMOTIONS) for _ in EMOTIONS]
    for row in everything_empathy:
        row[EMOTIONS.index("empathy")] = 4  # a model whose every reply sounds the same
    assert per_label_recall(everything_empathy, EMOTIONS)["empathy"] == 1.0
    assert working_labels(everything_empathy, EMOTIONS, 0.5) == [], "recall alone would tick empathy"
    assert confusion(["happy", "neutral", "nobody"], ["happy", "happy", "happy"], EMOTIONS)[1][1] == 1
    assert "| neutral | 3 | 1 |" in quality_markdown(report)


def test_the_quality_gate_checks_what_the_profile_sets_and_fails_on_missing_figures():
    report = _report()
    judges_only = QualityGate(min_emotion_judge_accuracy=0.8, min_speaker_judge_accuracy=0.9, max_evaluator_cer=0.35)
    gate = quality_gate(report, judges_only)
    assert gate.passed and {c.metric for c in gate.checks} == {"corpus.emotion_accuracy", "corpus.speaker_accuracy",
                                                               "corpus.cer"}
    strict = QualityGate(min_emotion_judge_accuracy=0.8, min_speaker_judge_accuracy=0.9, max_evaluator_cer=0.35,
                         min_emotion_control=0.85,
                         max_reply_cer=0.1, min_reply_mos_ratio=0.9)
    failed = quality_gate(report, strict)
    assert not failed.passed
    assert "replies.emotion_control 0.5 misses >= 0.85" in failed.reason and "replies.cer 0.95 misses" in failed.reason
    del report["sets"]["corpus"]["cer"]
    assert "corpus.cer not measured" in quality_gate(report, judges_only).reason


def test_the_signoff_report_shows_each_quality_item_with_its_ceiling_verdict_and_runs():
    report = _report()
    metrics = {f"{name}.{k}": v for name, figures in report["sets"].items() for k, v in figures.items()}
    info = {"name": "telugu-s2s", "version": "3", "aliases": ["challenger"], "run_id": "run-reg",
            "tags": {"profile": "smoke", "gates_passed": "true"},
            "evaluation": {"metrics": {"quality": metrics}, "gates": {}, "quality": report,
                           "runs": {"quality": "run-quality"}}}
    text = render_report(info, ["technical_lead"])
    assert "| MOS > 4.0 | >= 4 | 1.6 | ❌ misses |" in text
    assert "| Emotion recognition > 85% | >= 0.85 | 0.5 | ❌ misses |" in text
    assert "| DNSMOS P.808 | 1.60 | 3.20 | — | 2.50 |" in text  # replies, ceilings (corpus, renderings), round trip
    # a model without a text stream: no intelligibility for its replies; appropriateness is the CER vs the corpus
    assert "| Telugu accuracy (1 - CER; replies: against their own text) | — | 92.0% | — | 60.0% |" in text
    assert "| reply appropriateness (1 - CER against the corpus reply) | 5.0% | — | — | — |" in text
    assert "| Telugu accuracy > 90% | >= 0.9 | — | — not measured |" in text
    assert "| neutral | 4 | 75% | 50% | ✅ yes | — |" in text and "| happy | 4 | 25% | 50% | ❌ no | — |" in text
    assert "| laugh | 0 | — | — | — not measured | — |" in text
    assert "`run-quality`" in text and "`run-asr`" in text
    assert "not measured yet" not in text
    assert "never trained on" not in text   # judges without the held-out check: no line
    checked = {**report, "evaluators": {**report["evaluators"], "training": {
        "emotion": {"metrics": {"balanced_accuracy_rendered": 0.81}}, "speaker": {"metrics": {}}}}}
    text = render_report({**info, "evaluation": {**info["evaluation"], "quality": checked}}, ["technical_lead"])
    assert "balanced over the labels: the emotion judge 81%." in text
    bare = render_report({**info, "evaluation": {"metrics": {}, "gates": {}}}, ["technical_lead"])
    assert "| MOS > 4.0 | >= 4 | — | — not measured |" in bare


def test_intelligibility_is_the_cer_against_what_the_reply_says_it_spoke():
    """A model with a text stream: each reply is heard against its own text (intelligibility); the
    CER against the corpus's reply stays, labelled appropriateness in the report."""
    import numpy as np

    audio = np.zeros(8000, dtype=np.float32)
    replies = [Clip(audio, "నాన్న", "male_young", "neutral", (), said="అమ్మ"),
               Clip(audio, "", "male_young", "happy", (), said="అమ్మా")]
    figures, _ = judge(replies, _fake_judges())
    assert figures["intelligibility_cer"] == pytest.approx(1 / 9) and figures["cer"] == pytest.approx(4 / 5)
    plain, _ = judge([Clip(audio, "నాన్న", "male_young", "neutral", ())], _fake_judges())
    assert "intelligibility_cer" not in plain, "no text stream: no intelligibility"
    unscored, _ = judge(replies, _fake_judges(), mos=False)  # the renderings' way
    assert "dnsmos_p808" not in unscored and unscored["intelligibility_cer"] == figures["intelligibility_cer"]
    report = _report()
    assert "appropriateness" not in quality_markdown(report)
    report["sets"]["replies"]["intelligibility_cer"] = 0.25
    text = quality_markdown(report)
    assert "| CER (Telugu code points) | 0.080 | 0.400 | 0.250 |" in text
    assert "| appropriateness: CER against the corpus's reply | — | — | 0.950 |" in text


def test_the_renderings_ceiling_shows_beside_the_replies_in_both_reports():
    """The judges' ceiling (espeak-ng renderings in every control): per label in the sign-off
    report, and beside the replies' count in the quality report."""
    report = _report()
    ceiling = [[0] * len(EMOTIONS) for _ in EMOTIONS]
    ceiling[0][0], ceiling[1][1] = 4, 3  # the judge recognises neutral and happy when they are spoken right
    ceiling[1][0] = 1
    report["sets"]["rendered"] = {"intelligibility": 0.9, "telugu_accuracy": 0.9,
                                  "emotion_control": 0.875, "speaker_control": 1.0, "emotions_working": 2.0,
                                  "speakers_working": 1.0}
    report["confusion"]["rendered"] = {"emotion": ceiling, "speaker": report["confusion"]["replies"]["speaker"]}
    info = {"name": "telugu-s2s", "version": "3", "aliases": [], "run_id": "run-reg", "tags": {"profile": "smoke"},
            "evaluation": {"metrics": {}, "gates": {}, "quality": report, "runs": {}}}
    text = render_report(info, ["technical_lead"])
    assert "| DNSMOS P.808 | 1.60 | 3.20 | — | 2.50 |" in text  # the renderings are judged without MOS
    assert "| Telugu accuracy (1 - CER; replies: against their own text) | — | 92.0% | 90.0% | 60.0% |" in text
    assert "| reply appropriateness (1 - CER against the corpus reply) | 5.0% | — | — | — |" in text
    assert "| happy | 4 | 25% | 50% | ❌ no | yes |" in text and "| laugh | 0 | — | — | — not measured | no |" in text
    markdown = quality_markdown(report)
    assert "Emotions working: 1/9; speakers working: 1/4 (the judges' ceiling, espeak-ng renderings" in markdown
    assert ": 2/9 and 1/4)" in markdown and "Renderings (the judges' ceiling): requested emotion" in markdown


def test_a_reply_is_rendered_in_each_control_at_the_corpus_level():
    """render_controls speaks the sentence (without the corpus reply's own interjection) in each
    control with that control's interjection, at -23 LUFS like the data flow's output, repeatably."""
    import numpy as np
    import torch
    import torchaudio.functional as AF

    from core.config import load_params
    from tasks.data.synth_corpus import PROSODY
    from tasks.evaluation.rendered_ceiling import render_controls

    require_tool("espeak-ng", shutil.which("espeak-ng") is not None, "no speech to render")
    params = load_params("smoke", root=REPO)
    laugh = PROSODY["laugh"].interjection
    controls = [("male_young", "neutral"), ("female_young", "laugh")]
    first = render_controls(params, f"{laugh} నమస్కారం మీరు ఎలా ఉన్నారు", controls, seed=3)
    assert [said for _, said in first] == ["నమస్కారం మీరు ఎలా ఉన్నారు", f"{laugh} నమస్కారం మీరు ఎలా ఉన్నారు"]
    for audio, _ in first:
        assert audio.dtype == np.float32 and len(audio) > 0.5 * 16000
        assert AF.loudness(torch.from_numpy(audio)[None], 16000).item() == pytest.approx(-23.0, abs=1.0)
    assert len(first[1][0]) > len(first[0][0]), "the laugh is spoken before the sentence"
    again = render_controls(params, f"{laugh} నమస్కారం మీరు ఎలా ఉన్నారు", controls, seed=3)
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, again))
    with pytest.raises(ValueError, match="no sentence to render"):
        render_controls(params, laugh, controls, seed=3)

    from tasks.evaluation.model_quality import ReplyRequest, rendered_clips
    silent = np.zeros(1600, np.float32)
    requests = [ReplyRequest("only-a-laugh", silent, laugh, "male_young", "laugh"),
                ReplyRequest("p1", silent, "నమస్కారం", "female_young", "happy")]
    clips = rendered_clips(params, requests)  # the first has nothing to say again: skipped, not fatal
    assert len(clips) == 12 and {(c.speaker, c.emotion) for c in clips if "speaker" in c.judged_for} == \
        {(s, "happy") for s in SPEAKERS}
    assert sorted(c.emotion for c in clips if "emotion" in c.judged_for) == sorted(EMOTIONS)


def test_replies_drawn_several_times_are_pooled_and_each_draws_range_is_reported():
    """evaluation.reply_draws: one sample of a reply moves the figures by about 0.01 CER and 3
    points of control, so the evaluation can sample each reply several times; the figures pool
    the draws and the report says how far one draw alone strays."""
    import numpy as np

    from tasks.evaluation.model_quality import add_control_figures

    audio = np.zeros(8000, dtype=np.float32)
    replies = [Clip(audio, "", "male_young", "neutral", ("emotion", "speaker"), said="అమ్మ", draw=0),   # CER 0
               Clip(audio, "", "male_young", "happy", ("emotion", "speaker"), said="అమ్మా", draw=0),   # 1/5
               Clip(audio, "", "male_young", "neutral", ("emotion", "speaker"), said="నాన్న", draw=1),  # 4/5
               Clip(audio, "", "male_young", "neutral", ("emotion", "speaker"), said="అమ్మ", draw=1)]   # 0
    figures, matrices = judge(replies, _fake_judges())
    assert figures["draws"] == 2 and figures["items"] == 4
    assert figures["intelligibility_cer"] == pytest.approx(5 / 18)  # pooled over the 18 characters said
    assert (figures["intelligibility_cer_min"], figures["intelligibility_cer_max"]) == pytest.approx((1 / 9, 4 / 9))
    assert figures["emotion_accuracy"] == 0.75
    assert (figures["emotion_accuracy_min"], figures["emotion_accuracy_max"]) == (0.5, 1.0)
    assert sum(map(sum, matrices["emotion"])) == 4, "the confusion matrix counts every draw"
    add_control_figures(figures, matrices, 0.5)
    assert (figures["emotion_control"], figures["emotion_control_min"], figures["emotion_control_max"]) == (0.75, 0.5, 1.0)
    assert "emotion_accuracy_min" not in figures and figures["speaker_control_max"] == 0.0  # the fake hears no speaker
    single, _ = judge(replies[:2], _fake_judges())
    assert "draws" not in single and "intelligibility_cer_min" not in single, "one draw: nothing to range over"

    report = _report()
    assert "sampled" not in quality_markdown(report)
    report["sets"]["replies"] |= {"draws": 3.0, "intelligibility_cer": 0.3, "intelligibility_cer_min": 0.29,
                                  "intelligibility_cer_max": 0.31, "emotion_control_min": 0.45,
                                  "emotion_control_max": 0.55, "speaker_control_min": 1.0, "speaker_control_max": 1.0}
    sentence = ("Each reply was sampled 3 times and the figures pool the draws; one draw alone gives intelligibility "
                "CER 0.290 to 0.310, emotion control 45.0% to 55.0%, speaker control 100.0% to 100.0%.")
    assert sentence in quality_markdown(report)
    info = {"name": "telugu-s2s", "version": "3", "aliases": [], "run_id": "run-reg", "tags": {"profile": "cpu"},
            "evaluation": {"metrics": {}, "gates": {}, "quality": report, "runs": {}}}
    assert sentence in render_report(info, ["technical_lead"])


def test_the_first_draw_of_several_is_the_single_draw_and_the_others_differ(text_bundle_dir: Path, one_thread):
    """generate_replies with draws: one generator runs on, so draw 0 is what a single-draw
    evaluation makes and adding draws never changes the figures a previous report was built on."""
    import numpy as np

    from core.config import load_params
    from serving.bundle import load_bundle
    from tasks.evaluation.model_quality import ReplyRequest, generate_replies

    params = load_params("smoke", {"evaluation": {"temperature": 1.0, "top_k": None, "max_reply_seconds": 0.3}})
    bundle = load_bundle(text_bundle_dir)
    user = np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32)
    requests = [ReplyRequest("p1", user, "నమస్కారం", "female_young", "happy")]
    once = generate_replies(bundle, requests, params)
    twice = generate_replies(bundle, requests, params, draws=2)
    assert len(once) == 12 and len(twice) == 24 and {c.draw for c in twice} == {0, 1}
    for single, first in zip(once, twice[:12]):
        assert np.array_equal(single.audio, first.audio) and single.said == first.said and first.draw == 0
    assert any(not np.array_equal(a.audio, b.audio) for a, b in zip(twice[:12], twice[12:])), "a second draw samples anew"
    with pytest.raises(ValueError, match="reply_draws"):
        load_params("smoke", {"evaluation": {"reply_draws": 0}})
