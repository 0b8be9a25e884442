"""Sampling settings chosen on the validation split, recorded in the bundle, used by what follows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.config import load_params
from serving.bundle import load_bundle_dir, read_meta, recorded_sampling
from serving.turns import GenerationSettings

from .conftest import TINY

CANDIDATES = [{"temperature": 0.5, "top_k": 4}, {"temperature": 1.3, "top_k": None, "guidance": 2.0}]


def test_the_fewest_errors_win_on_val_and_the_choice_travels_with_the_bundle(tiny_corpus: Path, project_root: Path,
                                                                               text_bundle_dir: Path):
    from tasks.evaluation.model_quality import evaluate_quality
    from tasks.evaluation.sampling_search import choose_sampling

    bundle = project_root / "bundle"
    shutil.copytree(text_bundle_dir, bundle)
    params = load_params("smoke", {**TINY, "evaluation": {**TINY["evaluation"], "sampling_candidates": CANDIDATES,
                                                          "sampling_inputs": 1}})
    choice = choose_sampling(bundle, params, use_mlflow=False)
    assert choice["split"] == "val" and choice["inputs"] == 1 and len(choice["rows"]) == 2
    best = min(choice["rows"], key=lambda r: r["errors"])
    assert choice["chosen"] == best["settings"]
    for row in choice["rows"]:
        assert row["errors"] == pytest.approx(row["intelligibility_cer"] + (1 - row["speaker_control"])
                                              + (1 - row["emotion_control"]))
    assert [r["settings"]["guidance"] for r in choice["rows"]] == [1.0, 2.0]

    meta = read_meta(bundle)
    assert recorded_sampling(meta) == choice["chosen"]
    serving = params.serving
    chosen = GenerationSettings.from_params(serving, recorded_sampling(meta))
    assert (chosen.temperature, chosen.top_k, chosen.guidance) == tuple(choice["chosen"][k] for k in
                                                                         ("temperature", "top_k", "guidance"))
    plain = GenerationSettings.from_params(serving.model_copy(update={"sampling": "params"}), recorded_sampling(meta))
    assert (plain.temperature, plain.top_k) == (serving.temperature, serving.top_k)

    stored = project_root / params.evaluation.out_dir
    sampling_json = next(stored.glob("*/sampling.json"))
    mtime = sampling_json.stat().st_mtime_ns
    assert choose_sampling(bundle, params, use_mlflow=False) == choice
    assert sampling_json.stat().st_mtime_ns == mtime, "the search is kept, not redone"

    report = evaluate_quality(load_bundle_dir(bundle), params, "tiny", use_mlflow=False)
    assert report["stamp"]["evaluation"]["temperature"] == choice["chosen"]["temperature"]
    assert report["stamp"]["guidance"] == choice["chosen"]["guidance"]


def test_unknown_settings_and_no_candidates_are_refused(text_bundle_dir: Path):
    from tasks.evaluation.sampling_search import search_sampling

    params = load_params("smoke", TINY)
    with pytest.raises(ValueError, match="no sampling candidates"):
        search_sampling(load_bundle_dir(text_bundle_dir), params, None, [], 1)
    with pytest.raises(ValueError, match=r"unknown sampling setting\(s\) \['temprature'\]"):
        search_sampling(load_bundle_dir(text_bundle_dir), params, None, [{"temprature": 0.5}], 1)
