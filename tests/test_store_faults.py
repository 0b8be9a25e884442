"""The MLflow stores under faults, fast (the killed and locked cases with real training and flows
are in tests/test_chaos_stores.py): a version a kill left half-registered is finished by the
rerun, never registered twice (new sampling settings on the same weights are a new version); a
SQLite store locked by another process is retried for mlflow.lock_wait_s, then fails with one
line, and a run it could not end is ended by the next."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.config import load_params

EVALUATION = {"gates": {"codec": {"passed": True}, "s2s": {"passed": True}},
              "metrics": {"codec": {"stoi": 0.8, "pesq_wb": 1.5}, "s2s": {"perplexity": 100.0}}}


def test_a_version_left_half_registered_by_a_kill_is_finished_not_registered_again(project_root: Path,
                                                                                   bundle_dir: Path):
    """A kill between the version's creation (with its bundle_sha and sampling, one transaction)
    and its other tags and aliases leaves a bare version: the rerun finds it and finishes it."""
    from serving.bundle import bundle_sha, read_meta
    from tasks.release.registry import SAMPLING_TAG, mlflow_client, register_bundle, sampling_key

    params = load_params("smoke")
    client = mlflow_client(params)
    name = params.registry.model_name
    client.create_registered_model(name)
    client.create_model_version(name, source=str(bundle_dir), tags={"bundle_sha": bundle_sha(bundle_dir),
                                                                    SAMPLING_TAG: sampling_key(read_meta(bundle_dir))})

    version = register_bundle(bundle_dir, params, EVALUATION, {"profile": "smoke"})
    assert version.version == "1" and "challenger" in version.aliases
    [only] = client.search_model_versions(f"name = '{name}'")
    assert only.tags["registration"] == "complete" and only.tags["gates_passed"] == "true", only.tags
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    again = register_bundle(bundle_dir, params, EVALUATION, {"profile": "smoke"})
    assert again.version == "1" and again.reused
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def _lock(db: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOCK), str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    holder.wait(60)


def test_a_locked_sqlite_store_is_retried_then_refused_in_one_line_and_the_run_ended_later(project_root: Path):
    from tasks.training.tracker import UNFINISHED, RunTracker, TrackingStoreError

    import mlflow

    params = load_params("smoke", {"mlflow": {"lock_wait_s": 1, "system_metrics": False}})
    out = project_root / "artifacts" / "codec"
    db = project_root / "mlflow" / "mlflow.db"

    def tracker() -> RunTracker:
        return RunTracker.for_training(params, "codec", out, is_main=True, use_mlflow=True, resume_step=0, run_id=None)

    first = tracker()  # creates the store and a run
    first.log_metrics({"loss": 2.0}, step=1)
    holder = _lock(db)
    try:
        with pytest.raises(TrackingStoreError, match=r"the MLflow store sqlite:///.*mlflow\.db cannot be used: it is "
                                                     r"locked by another process \(waited 1 s"):
            first.log_metrics({"loss": 1.0}, step=2)
        first.finish("FAILED")  # cannot write either: left for the next tracker
        assert (out / UNFINISHED).is_file()
        with pytest.raises(TrackingStoreError, match="locked by another process"):
            tracker()
    finally:
        _release(holder)
    try:
        second = tracker()
        second.finish()
        assert not (out / UNFINISHED).exists()
        with sqlite3.connect(db) as conn:
            statuses = dict(conn.execute("select run_uuid, status from runs").fetchall())
        assert statuses == {first.run_id: "FAILED", second.run_id: "FINISHED"}, statuses
    finally:
        while mlflow.active_run() is not None:  # the first run, still on this process's stack
            mlflow.end_run(status="FAILED")


def test_new_sampling_settings_on_the_same_weights_are_a_new_version(project_root: Path, bundle_dir: Path,
                                                                     tmp_path: Path):
    """Serving samples with the settings a bundle records, so the same weights with another choice
    (another search, other candidates) register as a new version; the same choice is reused."""
    from core import atomic
    from serving.bundle import read_meta
    from tasks.release.registry import SAMPLING_TAG, mlflow_client, register_bundle

    params = load_params("smoke")
    first = register_bundle(bundle_dir, params, EVALUATION, {"profile": "smoke"})
    other = tmp_path / "bundle"
    shutil.copytree(bundle_dir, other)
    chosen = {"temperature": 0.3, "top_k": 5, "guidance": 1.0}
    atomic.write_json(other / "bundle.json", {**read_meta(other), "sampling": {"chosen": chosen}})
    second = register_bundle(other, params, EVALUATION, {"profile": "smoke"})
    assert (first.version, second.version) == ("1", "2") and not second.reused
    tag = mlflow_client(params).get_model_version(params.registry.model_name, "2").tags[SAMPLING_TAG]
    assert json.loads(tag) == chosen
    again = register_bundle(other, params, EVALUATION, {"profile": "smoke"})
    assert again.version == "2" and again.reused
