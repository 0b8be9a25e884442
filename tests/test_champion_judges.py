"""A champion measured by other judges is evaluated again by the candidate's before promotion
compares them (tasks/release/champion_judges.py): on a real MLflow store, with the evaluation
itself replaced by a report of known figures (its own tests are in test_model_quality.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_params

OLD = {"asr": "asr-old", "emotion": "emo-old", "speaker": "spk-old"}
NEW = {"asr": "asr-old", "emotion": "emo-new", "speaker": "spk-old"}
EVALUATION = {"gates": {"codec": {"passed": True}}, "metrics": {"quality": {"replies.emotion_control": 0.30}}}


def test_other_judges_counts_only_judges_known_on_both_sides() -> None:
    from tasks.release.promotion import other_judges

    assert other_judges(OLD, NEW) == ["emotion"]
    assert other_judges(OLD, OLD) == []
    assert other_judges({}, NEW) == [] and other_judges(OLD, {"emotion": ""}) == []


@pytest.fixture
def champion(project_root: Path, bundle_dir: Path):
    """Version 1, champion, whose figures the old emotion judge measured."""
    from tasks.release.registry import mlflow_client, register_bundle

    params = load_params("smoke")
    tags = {"profile": "smoke", **{f"evaluator.{k}_run_id": v for k, v in OLD.items()}}
    version = register_bundle(bundle_dir, params, EVALUATION, tags)
    assert "champion" in version.aliases
    return params, mlflow_client(params)


def test_a_champion_judged_by_others_is_evaluated_again_and_retagged(champion, monkeypatch) -> None:
    from tasks.release import champion_judges
    from tasks.release.promotion import figures_from_tags, judges_from_tags

    params, client = champion
    calls = []

    def evaluate(bundle, params, sha, parent_run_id=None):
        calls.append(sha)
        return {"run_id": "quality-run", "evaluators": {"runs": NEW},
                "sets": {"replies": {"emotion_control": 0.55}}}

    monkeypatch.setattr(champion_judges, "evaluate_quality", evaluate)
    done = champion_judges.reevaluate_champion(params, NEW)
    assert done == {"version": "1", "judges": ["emotion"], "reevaluated": True, "quality_run_id": "quality-run"}
    tags = client.get_model_version("telugu-s2s", "1").tags
    assert judges_from_tags(tags) == NEW, "the champion's figures are now by the candidate's judges"
    assert figures_from_tags(tags)["quality.replies.emotion_control"] == pytest.approx(0.55)
    assert champion_judges.reevaluate_champion(params, NEW)["reevaluated"] is False and len(calls) == 1


def test_a_champion_that_cannot_be_evaluated_holds_promotion_back_without_failing(champion, monkeypatch) -> None:
    from tasks.release import champion_judges
    from tasks.release.promotion import judges_from_tags

    params, client = champion

    def broken(*args, **kwargs):
        raise OSError("bundle.json is not readable")

    monkeypatch.setattr(champion_judges, "evaluate_quality", broken)
    done = champion_judges.reevaluate_champion(params, NEW)
    assert not done["reevaluated"] and "bundle.json is not readable" in done["error"]
    assert judges_from_tags(client.get_model_version("telugu-s2s", "1").tags) == OLD, "its tags are left as they were"


def test_no_champion_means_nothing_to_evaluate(project_root: Path) -> None:
    from tasks.release.champion_judges import reevaluate_champion

    assert reevaluate_champion(load_params("smoke"), NEW) == {"version": None, "judges": [], "reevaluated": False}



def test_a_rerun_that_evaluates_a_registered_model_again_updates_its_figures(champion, bundle_dir: Path,
                                                                            tmp_path: Path) -> None:
    """The same weights and sampling registered again with a newer evaluation (more draws, other
    judges): the version is reused, and its tags, promotion's figures and its sign-off report
    now read the newer evaluation, not the one made when it was registered."""
    import json

    from tasks.release.promotion import figures_from_tags, judges_from_tags
    from tasks.release.registry import register_bundle, version_info

    params, client = champion
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    run_id = client.create_run(experiment.experiment_id, run_name="quality").info.run_id
    report = {"sets": {"replies": {"emotion_control": 0.62, "draws": 3.0}}, "confusion": {}, "labels": {},
              "working_share": 0.5, "evaluators": {"runs": NEW}}
    (tmp_path / "quality.json").write_text(json.dumps(report))
    client.log_artifact(run_id, str(tmp_path / "quality.json"))
    newer = {**EVALUATION, "metrics": {"quality": {"replies.emotion_control": 0.62}}, "quality": report,
             "runs": {"quality": run_id}}
    version = register_bundle(bundle_dir, params, newer, {"profile": "smoke", "quality_run_id": run_id})
    assert version.reused and version.version == "1"
    tags = client.get_model_version("telugu-s2s", "1").tags
    assert tags["quality_run_id"] == run_id and judges_from_tags(tags) == NEW
    assert figures_from_tags(tags)["quality.replies.emotion_control"] == pytest.approx(0.62)
    info = version_info(client, "telugu-s2s", "1")
    assert info["evaluation"]["quality"]["sets"]["replies"]["draws"] == 3.0
    assert info["evaluation"]["metrics"]["quality"]["replies.emotion_control"] == pytest.approx(0.62)
    again = register_bundle(bundle_dir, params, newer, {"profile": "smoke", "quality_run_id": run_id})
    assert again.reused and client.get_model_version("telugu-s2s", "1").tags == tags, "nothing newer: nothing changes"
