"""The data flow end to end on a small embedded corpus, through Prefect, and its CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from s2s.cli import app

from .conftest import small_corpus_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
SMALL_CORPUS_DIGESTS = REPO / "tests" / "small_corpus.digests"


def check_digests(data: Path, listing: Path) -> None:
    """The corpus file by file against a committed digest list (S2S_WRITE_DIGESTS=1 rewrites it,
    after a deliberate change of the corpus's inputs or writers)."""
    import os

    from tasks.data import digests

    actual = digests.tree_digests(data)
    if os.environ.get("S2S_WRITE_DIGESTS") == "1":
        digests.write(listing, actual)
    differences = digests.compare(digests.read(listing), actual)
    assert not differences, (f"the corpus differs from {listing.name} in {len(differences)} files:\n"
                             + "\n".join(differences[:30]))


def test_data_flow_builds_checks_versions_and_reruns_for_free(project_root: Path, tmp_path: Path, prefect_harness):
    from flows.data_flow import data_flow

    overrides = small_corpus_overrides(tmp_path)
    summary = data_flow(profile="smoke", overrides=overrides)
    data = project_root / "data"

    # every deliberately bad item is caught, each with a reason naming its problem
    quarantine = pd.read_csv(data / "quarantine.csv")
    codes = quarantine.groupby("source_id")["reason_code"].agg(set).to_dict()
    assert codes["bad_clipping"] == {"clipping"}
    assert codes["bad_too_quiet"] == {"too_quiet"}
    assert "low_snr" in codes["bad_low_snr"]
    assert codes["bad_truncated"] == {"recording_truncated"}
    truncated = quarantine[quarantine["source_id"] == "bad_truncated"]["reason"].iloc[0]
    assert "truncated: the header declares" in truncated
    assert all(quarantine[quarantine["reason_code"] == "clipping"]["reason"].str.contains("clipping_ratio"))

    manifest = pd.read_csv(data / "manifest.csv")
    assert not manifest["source_id"].str.startswith("bad_").any()
    assert set(manifest["source_id"]) == {"ep01", "ep02", "ep03"}
    assert manifest["duration_s"].between(1, 15).all()
    assert all((data / p).is_file() for p in manifest["path"])
    assert all((data / p).is_file() for p in quarantine["path"].dropna())

    splits = json.loads((data / "splits.json").read_text())
    seen = [s for ids in splits.values() for s in ids]
    assert len(seen) == len(set(seen)), "no source in two splits"
    assert (manifest.groupby("source_id")["split"].nunique() == 1).all()

    pairs = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    assert pairs and summary["pairs"] == len(pairs)
    assert all(p["input_speaker"] != p["reply_speaker"] and 0 <= p["gap_s"] <= 1.5 for p in pairs)
    truth = json.loads((project_root / "artifacts/embedded/truth/ep01.json").read_text())
    assert {p["reply_emotion"] for p in pairs if p["source_id"] == "ep01"} == {truth["emotion"]}

    # bit-identical on every machine: each file as the committed digest list says (a difference names the file)
    check_digests(data, SMALL_CORPUS_DIGESTS)

    dvc_file = yaml.safe_load((project_root / "data.dvc").read_text())
    assert summary["corpus_hash"] == dvc_file["outs"][0]["md5"]
    validation = json.loads((data / "reports/validation.json").read_text())
    assert validation["corpus_table"]["success"] is True and validation["quarantined"] == len(quarantine) - 1
    assert summary["quarantine_reasons"]["recording_truncated"] == 1

    # a second run with nothing changed redoes nothing and yields the same corpus
    stamps = {p: p.stat().st_mtime_ns for p in [data / "reports/summary.json",
                                                *(project_root / "artifacts/normalized").rglob("*.wav")]}
    again = data_flow(profile="smoke", overrides=overrides)
    assert again["corpus_hash"] == summary["corpus_hash"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["data-summary", "data-validation"])))
    by_key = {a.key: a.data for a in artifacts}
    assert "corpus hash" in by_key["data-summary"]
    assert "expect_column_values_to_be_between" in str(by_key["data-validation"])

    # rebuilt from scratch from the same inputs, the corpus has the same DVC hash (nothing volatile
    # such as GX's run ids or times in it), so a fresh clone's run matches the committed data.dvc
    import shutil

    shutil.rmtree(data)
    rebuilt = data_flow(profile="smoke", overrides=overrides)
    assert rebuilt["corpus_hash"] == summary["corpus_hash"]


def test_cli_refuses_bad_input_cleanly(project_root: Path, tmp_path: Path, prefect_harness):
    runner = CliRunner()
    result = runner.invoke(app, ["flow", "data", "--set", "segment.vad_treshold=0.3"])
    assert result.exit_code == 2 and "unknown parameter 'segment.vad_treshold'" in result.output

    empty = tmp_path / "sources.yaml"
    empty.write_text("sources: []\n")
    result = runner.invoke(app, ["flow", "data", "--sources", str(empty)])
    assert result.exit_code == 2 and "lists no sources" in result.output
    assert not (project_root / "data").exists(), "nothing half-written"

    result = runner.invoke(app, ["flow", "data", "--profile", "turbo"])
    assert result.exit_code == 2 and "unknown profile 'turbo'" in result.output


@pytest.mark.full_corpus
def test_the_full_embedded_corpus_matches_the_committed_digests(project_root: Path, tmp_path: Path, prefect_harness):
    """The whole embedded corpus (what `make pipeline` builds and data.dvc pins) rebuilt from
    scratch, file by file against data.digests. About 2 min of CPU on 2 cores, so not in `make
    test` (the small corpus above is): `pytest -m full_corpus tests/test_data_flow.py`."""
    from flows.data_flow import data_flow

    summary = data_flow(profile="smoke", overrides={"version": {"remote_url": str(tmp_path / "dvc-remote")}})
    check_digests(project_root / "data", REPO / "data.digests")
    committed = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert summary["corpus_hash"] == committed["md5"]
