"""Auto-promotion compares the challenger with the champion: a model worse on what users hear is
never promoted, whatever gates it passed."""

from __future__ import annotations

from tasks.release.promotion import compare_with_champion, figures_from_tags, judges_from_tags

CHAMPION = {"codec.stoi": 0.90, "codec.pesq_wb": 2.0, "quality.codec_roundtrip.cer": 0.2,
            "quality.replies.cer": 0.5, "quality.replies.emotion_control": 0.6,
            "quality.replies.speaker_control": 0.9, "quality.replies.dnsmos_p808": 2.5}


def test_no_champion_means_promote() -> None:
    decision = compare_with_champion(CHAMPION, None, None)
    assert decision.promote and decision.reason == "no champion yet"


def test_noise_is_not_worse_but_a_real_loss_blocks_promotion() -> None:
    noisy = {**CHAMPION, "codec.stoi": 0.895, "quality.replies.cer": 0.51}
    assert compare_with_champion(noisy, CHAMPION, "3").promote
    worse = {**CHAMPION, "quality.replies.speaker_control": 0.5, "codec.pesq_wb": 2.5}
    decision = compare_with_champion(worse, CHAMPION, "3")
    assert not decision.promote
    assert decision.reason == "worse than champion version 3 on quality.replies.speaker_control (0.5 vs 0.9)"
    verdicts = {row["metric"]: row["verdict"] for row in decision.to_dict()["rows"]}
    assert verdicts["codec.pesq_wb"] == "better" and verdicts["codec.stoi"] == "same"


def test_missing_figures_old_champions_and_tags() -> None:
    partial = {k: v for k, v in CHAMPION.items() if k != "quality.replies.cer"}
    assert not compare_with_champion(partial, CHAMPION, "2").promote     # unmeasured is not better
    old = {"codec.stoi": 0.7}                                             # an older champion knew less
    decision = compare_with_champion(CHAMPION, old, "1")
    assert decision.promote and {r.verdict for r in decision.rows} == {"better", "not compared"}
    tags = {"codec.stoi": "0.9012", "quality.replies.cer": "0.5", "gates_passed": "true", "codec.pesq_wb": "n/a"}
    assert figures_from_tags(tags) == {"codec.stoi": 0.9012, "quality.replies.cer": 0.5}


def test_one_reply_judged_otherwise_is_noise_in_a_control_share() -> None:
    """Speaker control over 32 replies: 31 of 32 against 32 of 32 is one reply (the cpu profile's
    third version was held back by it); two replies are a loss. Without counts, the fixed tolerance."""
    counted = {**CHAMPION, "quality.replies.speaker_control": 1.0, "quality.replies.speaker_judged": 32.0}
    one_off = {**counted, "quality.replies.speaker_control": 31 / 32}
    assert compare_with_champion(one_off, counted, "2").promote
    two_off = {**counted, "quality.replies.speaker_control": 30 / 32}
    assert not compare_with_champion(two_off, counted, "2").promote
    uncounted_champion = {k: v for k, v in counted.items() if not k.endswith("_judged")}
    assert compare_with_champion(one_off, uncounted_champion, "2").promote   # the challenger's count serves
    no_counts = {k: v for k, v in one_off.items() if not k.endswith("_judged")}
    assert not compare_with_champion(no_counts, uncounted_champion, "2").promote  # 0.031 > 0.03 without them
    assert figures_from_tags({"quality.replies.speaker_judged": "32"}) == {"quality.replies.speaker_judged": 32.0}


def test_figures_of_another_judge_get_no_verdict_and_hold_promotion_back() -> None:
    """A judge retrained on other data (the emotion judge that learns from renderings) measures
    differently: the champion's figures by the old weights are not compared until re-evaluated."""
    better = {**CHAMPION, "quality.replies.emotion_control": CHAMPION["quality.replies.emotion_control"] + 0.2}
    judges = {"asr": "a1", "emotion": "e1", "speaker": "s1"}
    same = compare_with_champion(better, CHAMPION, "2", judges, dict(judges))
    assert same.promote and {r.metric: r.verdict for r in same.rows}["quality.replies.emotion_control"] == "better"
    other = compare_with_champion(better, CHAMPION, "2", judges, {**judges, "emotion": "e0"})
    verdicts = {r.metric: r.verdict for r in other.rows}
    assert verdicts["quality.replies.emotion_control"] == "other judge"
    assert verdicts["quality.replies.speaker_control"] != "other judge" and verdicts["codec.stoi"] != "other judge"
    assert not other.promote and "s2s eval --model champion" in other.reason
    assert compare_with_champion(better, CHAMPION, "2", judges, None).promote   # an old champion: unknown judges
    assert judges_from_tags({"evaluator.emotion_run_id": "e1", "evaluator.asr_run_id": "None", "stage": "x"}) == {
        "emotion": "e1"}


def test_the_signoff_report_says_not_comparable_when_only_the_judges_differ() -> None:
    import json

    from tasks.release.signoff import promotion_section

    judges = {"asr": "a1", "emotion": "e1", "speaker": "s1"}
    other = compare_with_champion(CHAMPION, CHAMPION, "2", judges, {**judges, "emotion": "e0"})
    text = "\n".join(promotion_section({"promotion": json.dumps(other.to_dict())}))
    assert "Not comparable: quality.replies.emotion_control of champion version 2 were measured by other" in text
    assert "| quality.replies.emotion_control | 0.6 | 0.6 | other judge |" in text
    worse = compare_with_champion({**CHAMPION, "codec.stoi": 0.5}, CHAMPION, "2", judges, {**judges, "emotion": "e0"})
    assert "\nWorse: worse than champion version 2 on codec.stoi" in "\n".join(
        promotion_section({"promotion": json.dumps(worse.to_dict())}))
