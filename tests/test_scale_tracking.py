"""Tracking and registry for a team (docs/scaling.md, "Tracking"): `mlflow server` on PostgreSQL
with its artifacts in S3 (moto) served through the server. One "machine" (a project folder) tracks
a training run and registers a model there; another folder with no local store then loads
`models:/telugu-s2s@champion`, publishes it and serves it, as `s2s publish` and `s2s serve` do.
Nothing lands in either folder's mlflow/: the runs are in PostgreSQL, the files in the bucket.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_params

from .conftest import REPO
from .loopback_servers import mlflow_server, moto_s3, postgres

BUCKET = "team-mlflow"
EVALUATION = {"gates": {"codec": {"passed": True}, "s2s": {"passed": True}},
              "metrics": {"codec": {"stoi": 0.8, "pesq_wb": 1.5}, "s2s": {"perplexity": 100.0}}}


def _machine(tmp_path: Path, name: str) -> Path:
    """A project folder as a second machine has it: the settings, and no store of its own."""
    root = tmp_path / name
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def test_a_team_tracks_registers_and_serves_through_mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  bundle_dir: Path):
    import mlflow

    from serving.bundle import load_bundle
    from tasks.benchmarks.load_client import http_json
    from tasks.benchmarks.server_launcher import ServerProcess
    from tasks.release.registry import register_bundle
    from tasks.training.tracker import RunTracker, TrackingError, use_experiment

    logs = tmp_path / "logs"
    logs.mkdir()
    with postgres(logs) as pg, moto_s3(logs, (BUCKET,)) as s3, \
            mlflow_server(pg.createdb("mlflow"), f"s3://{BUCKET}/artifacts", s3, logs) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server)

        # machine A trains (a tracked run with a checkpoint) and registers a candidate
        trainer = _machine(tmp_path, "trainer")
        monkeypatch.setenv("S2S_ROOT", str(trainer))
        params = load_params("smoke", root=trainer)
        checkpoint = trainer / "artifacts" / "codec" / "checkpoint.pt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"weights")
        tracker = RunTracker.for_training(params, "codec", checkpoint.parent, is_main=True, use_mlflow=True,
                                          resume_step=0, run_id=None)
        tracker.log_params({"steps": 1})
        tracker.log_metrics({"loss": 1.5}, step=1)
        tracker.log_artifact(checkpoint, "checkpoints")
        tracker.finish()
        version = register_bundle(bundle_dir, params, EVALUATION, {"profile": "smoke"})
        assert version.version == "1" and set(version.aliases) == {"challenger", "champion"}

        experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
        assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
        run = mlflow.get_run(tracker.run_id)
        assert run.data.metrics["loss"] == 1.5 and run.info.artifact_uri.startswith("mlflow-artifacts:")
        keys = s3.keys(BUCKET, "artifacts/")
        assert any(k.endswith("checkpoints/checkpoint.pt") for k in keys), keys
        assert any(k.endswith("bundle/bundle.json") for k in keys), keys
        assert not (trainer / "mlflow").exists(), "nothing of the store on the trainer's disk"

        # an experiment that an older client created with a folder of its own is refused, by name
        mlflow.MlflowClient(server).create_experiment("stranded", artifact_location=(tmp_path / "x").as_uri())
        with pytest.raises(TrackingError, match="'stranded'.*other clients cannot read"):
            use_experiment(trainer, None, "stranded")

        # machine B: another folder, no local store, the same server
        server_machine = _machine(tmp_path, "server-machine")
        monkeypatch.setenv("S2S_ROOT", str(server_machine))
        monkeypatch.chdir(server_machine)
        bundle = load_bundle("models:/telugu-s2s@champion")
        assert bundle.codec.config.n_codebooks == 2

        published = subprocess.run([sys.executable, "-m", "s2s.cli", "publish", "--model", "champion"],
                                   capture_output=True, text=True, timeout=600)
        assert published.returncode == 0, published.stdout[-3000:] + published.stderr[-3000:]
        sums = list((server_machine / "artifacts" / "publish").rglob("SHA256SUMS"))
        assert len(sums) == 2, published.stdout[-2000:]

        with ServerProcess(None, log_path=logs / "serve.log", startup_timeout_s=600) as serve:  # serving.model: the champion
            config = http_json(f"http://127.0.0.1:{serve.port}/stats")
        assert "telugu-s2s@champion" in str(config), config
        assert not (server_machine / "mlflow").exists()
