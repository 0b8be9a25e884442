"""`make ui` end to end: scripts/ui.sh on a throwaway project root brings up Prefect with the
deployments registered (schedule on) and a worker, next to MLflow; a `train` run started with the
call the Prefect UI's "Run" button makes (POST /api/deployments/{id}/create_flow_run) completes on
the worker that ui.sh started, and registers a version whose MLflow page has a description and a
signature. Tiny model and lenient gates (tests/conftest.py), so the training takes a few minutes.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from tasks.benchmarks.server_launcher import free_port

from .conftest import LENIENT, REPO, TINY
from .loopback_servers import Process, prefect_env
from .test_deployments import _client, _run_logs

pytestmark = pytest.mark.slow


def _wait_for_line(process: Process, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = process.log.read_text(errors="replace") if process.log.exists() else ""
        if text in log:
            return log
        assert process.popen.poll() is None, f"ui.sh exited before it was ready\n{process.tail()}"
        assert time.monotonic() < deadline, f"ui.sh not ready after {timeout:.0f} s\n{process.tail()}"
        time.sleep(2)


def test_make_ui_registers_the_deployments_and_a_ui_run_completes_on_its_worker(
        tiny_corpus: Path, project_root: Path, tmp_path: Path):
    shutil.copy(REPO / "prefect.yaml", project_root / "prefect.yaml")
    shutil.copytree(REPO / "flows", project_root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    prefect_port, mlflow_port = free_port(), free_port()
    env = prefect_env(project_root / ".prefect")
    env.update(S2S_ROOT=str(project_root), PREFECT_PORT=str(prefect_port), MLFLOW_PORT=str(mlflow_port),
               PREFECT_WORKER_QUERY_SECONDS="2", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    ui = Process(["bash", str(REPO / "scripts" / "ui.sh")], tmp_path / "ui.log", env, project_root)
    api = f"http://127.0.0.1:{prefect_port}/api"
    try:
        said = _wait_for_line(ui, "Ctrl-C stops all three.", timeout=420)
        assert "deployments registered from" in said and "pipeline/pipeline" in said
        assert "schedule on (0 3 * * 1 UTC)" in said, said
        assert f"http://127.0.0.1:{mlflow_port}" in said and "deployment run train/train" in said
        assert httpx.get(f"http://127.0.0.1:{mlflow_port}/health", timeout=10).status_code == 200

        from prefect.client.schemas.objects import WorkerStatus

        with _client(api) as client:
            deployments = {d.name: d for d in client.read_deployments()}
            assert set(deployments) == {"data", "train", "pipeline"}
            assert [s.active for s in deployments["pipeline"].schedules] == [True]
            client.pause_deployment(deployments["pipeline"].id)  # so the worker takes only the run below
            deadline = time.monotonic() + 120
            while not [w for w in client.read_workers_for_work_pool("s2s-process")
                       if w.name.startswith("make-ui-") and w.status == WorkerStatus.ONLINE]:
                assert time.monotonic() < deadline, f"no make-ui worker online\n{ui.tail()}"
                time.sleep(2)

        # the Prefect UI's "Run" button: POST /deployments/{id}/create_flow_run with the form's parameters
        train = deployments["train"]
        response = httpx.post(f"{api}/deployments/{train.id}/create_flow_run", timeout=30, json={
            "parameters": {"profile": "smoke", "overrides": TINY, "thresholds": LENIENT},
            "state": {"type": "SCHEDULED", "name": "Scheduled", "message": "Run from the Prefect UI"}})
        assert response.status_code == 201, response.text
        run_id = response.json()["id"]

        with _client(api) as client:
            deadline = time.monotonic() + 1200
            while not (run := client.read_flow_run(run_id)).state.is_final():
                assert ui.popen.poll() is None, f"ui.sh exited\n{ui.tail()}"
                assert time.monotonic() < deadline, f"train run still {run.state.name}\n{_run_logs(client, run.id)}"
                time.sleep(5)
            worker_log = (project_root / ".prefect" / "ui-worker.log").read_text(errors="replace")
            assert run.state.is_completed(), (f"train run ended {run.state.name}: {run.state.message}\n"
                                              f"{_run_logs(client, run.id)}\n{worker_log[-4000:]}")
            assert run.deployment_id == train.id and run.work_pool_name == "s2s-process"
            assert run_id in worker_log, "the worker ui.sh started ran it"
    finally:
        ui.stop()

    # the registered version: a description on its MLflow page, and the logged signature
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{project_root / 'mlflow' / 'mlflow.db'}"
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("telugu-s2s", "1")
    assert "Load it:" in version.description and "models:/telugu-s2s/1" in version.description
    assert "Gates: codec passed" in version.description
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    signature = mlflow.models.get_model_info("models:/telugu-s2s/1").signature
    assert signature is not None and signature.inputs.input_names() == ["audio", "speaker", "emotion"]
    assert "temperature" in {p.name for p in signature.params.params}
