"""The main job end to end on a small embedded corpus: data -> train -> gates -> registry ->
sign-off report -> publish (locally: no token), as one tree of MLflow runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_params

from .conftest import LENIENT, TINY, small_corpus_overrides

pytestmark = pytest.mark.slow


def test_pipeline_flow_runs_the_whole_chain(project_root: Path, tmp_path: Path, prefect_harness, one_thread,
                                            monkeypatch: pytest.MonkeyPatch):
    from flows.pipeline_flow import pipeline_flow
    from tasks.release.registry import mlflow_client

    monkeypatch.delenv("HF_TOKEN", raising=False)
    # 3 good episodes: seed 15 puts one in each split (ep01 train, ep03 val, ep02 test)
    overrides = {**small_corpus_overrides(tmp_path), **TINY,
                 "splits": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 15}}
    result = pipeline_flow(profile="smoke", overrides=overrides, thresholds=LENIENT)

    assert result["corpus"]["segments_kept"] > 0 and result["corpus"]["corpus_hash"]
    train = result["train"]
    assert train["version"] == "1" and "champion" in train["aliases"]
    assert result["publish"]["mode"] == "local" and "HF_TOKEN" in result["publish"]["message"]
    assert Path(result["links"]["signoff_report"]).is_file()

    client = mlflow_client(load_params("smoke", overrides))
    experiment = client.get_experiment_by_name("telugu-s2s").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert {r.data.tags["stage"] for r in children} == {"data", "train"}
    [data_run] = [r for r in children if r.data.tags["stage"] == "data"]
    assert data_run.data.metrics["segments_kept"] == result["corpus"]["segments_kept"]
    assert data_run.data.tags["corpus_hash"] == result["corpus"]["corpus_hash"]
    version = client.get_model_version("telugu-s2s", "1")
    assert version.tags["corpus_hash"] == result["corpus"]["corpus_hash"], "the model names the corpus it learned"
