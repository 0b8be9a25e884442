"""The deployments of prefect.yaml, end to end: a real Prefect server on loopback, `prefect deploy
--all` of the project's own prefect.yaml, a run started through the API as the UI starts one, and a
process worker that runs it in the project root.

The throwaway project root holds params.yaml, prefect.yaml and a copy of flows/, the layout the
deployments assume: `prefect deploy` runs in the project root (the entrypoints are paths relative to
it and prefect.yaml's build step records it for the pull step), and the worker's flow-run process
changes into it before loading the flow. The tasks and s2s packages come from the installed
project, as they do for the real worker.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from tasks.benchmarks.server_launcher import free_port

from .conftest import REPO, small_corpus_overrides
from .loopback_servers import Process, _signal_group, http_ok, prefect_env

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).with_name("prefect"))
DEPLOYMENTS = {  # deployment -> the parameters a user sets in the UI
    "data": {"profile", "sources_file", "overrides"},
    "train": {"profile", "overrides", "thresholds"},
    "pipeline": {"profile", "sources_file", "overrides", "thresholds", "publish"},
}
PULL_STEP = "prefect.deployments.steps.set_working_directory"


@pytest.fixture()
def prefect_server(tmp_path: Path):
    """A Prefect server as a subprocess on a free loopback port, with its own home and SQLite file.

    Yields (api_url, env for clients, the server Process). Startup can take a minute here."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {**prefect_env(home), "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}"}
    port = free_port()
    server = Process([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     tmp_path / "server.log", env, tmp_path)
    api = f"http://127.0.0.1:{port}/api"
    try:
        server.wait_until(lambda: http_ok(f"{api}/health"), "the Prefect server", 120)
        client_env = {**env, "PREFECT_API_URL": api}
        client_env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
        yield api, client_env, server
    finally:
        server.stop()


@contextmanager
def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"prefect {' '.join(args)} failed (rc={result.returncode}):\n{output[-8000:]}"
    return output


def _run_logs(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    try:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(flow run logs unavailable: {exc})"
    return "--- flow run logs ---\n" + "\n".join(f"{log.level:>2} {log.name}: {log.message}" for log in logs)[-8000:]


def test_deployments_deploy_and_a_ui_run_completes_on_a_process_worker(
        project_root: Path, tmp_path: Path, prefect_server):
    api, env, server = prefect_server
    shutil.copy(REPO / "prefect.yaml", project_root / "prefect.yaml")
    shutil.copytree(REPO / "flows", project_root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    spec = yaml.safe_load((project_root / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == set(DEPLOYMENTS)

    _cli(["work-pool", "create", "s2s-process", "--type", "process"], env, project_root, timeout=120)
    deploy_output = _cli(["deploy", "--all", "--no-prompt"], env, project_root)

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import PrefectHTTPStatusError

    with _client(api) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert set(deployments) == set(DEPLOYMENTS), deploy_output[-4000:]
        for name, params in DEPLOYMENTS.items():
            deployment = deployments[name]
            entry = next(d for d in spec["deployments"] if d["name"] == name)
            assert deployment.entrypoint == entry["entrypoint"]
            assert deployment.work_pool_name == "s2s-process" and deployment.work_queue_name == "default"
            assert deployment.description and deployment.tags and "telugu-s2s" in deployment.tags
            # the UI's run form: every parameter there, with the defaults of prefect.yaml
            assert set(deployment.parameters) == params, f"{name}: {deployment.parameters}"
            assert deployment.parameters["profile"] == "smoke" and deployment.parameters["overrides"] == {}
            assert params <= set(deployment.parameter_openapi_schema["properties"]), name
            assert deployment.enforce_parameter_schema
            # the worker changes into the project root that `prefect deploy` ran in
            (step,) = deployment.pull_steps
            assert Path(step[PULL_STEP]["directory"]).resolve() == project_root.resolve(), step
        assert deployments["pipeline"].parameters["publish"] is True

        # the weekly retraining: only on the pipeline, Mondays 03:00 UTC, with the production profile
        assert not deployments["data"].schedules and not deployments["train"].schedules
        pipeline = deployments["pipeline"]
        (schedule,) = pipeline.schedules
        assert schedule.active and schedule.schedule.cron == "0 3 * * 1" and schedule.schedule.timezone == "UTC"
        assert schedule.parameters == {"profile": "production"}
        # ... and the server's scheduler turns it into future runs on Mondays at 03:00 UTC
        only_pipeline = DeploymentFilter(id=DeploymentFilterId(any_=[pipeline.id]))
        deadline = time.monotonic() + 90
        while not (upcoming := client.read_flow_runs(deployment_filter=only_pipeline)):
            # Prefect 3.8.8's scheduler inserts runs with the hybrid FlowRun.state in a bulk insert,
            # which SQLAlchemy 2.1 refuses: with it installed no scheduled run is ever created
            assert "Can't evaluate bulk DML" not in server.log.read_text(errors="replace"), (
                "the server's scheduler fails to create the weekly runs (Prefect 3.8.8 with SQLAlchemy "
                f">= 2.1: pin SQLAlchemy < 2.1)\n{server.tail()}")
            assert time.monotonic() < deadline, f"no scheduled pipeline runs after 90 s\n{server.tail()}"
            time.sleep(2)
        now = datetime.now(timezone.utc)
        for run in upcoming:
            start = run.expected_start_time.astimezone(timezone.utc)
            assert run.state.type == StateType.SCHEDULED and start > now
            assert (start.weekday(), start.hour, start.minute) == (0, 3, 0), start
            assert run.parameters["profile"] == "production"
        # Pause it (the UI's toggle) so that the worker below picks only the run started here, even
        # on a Monday at 03:00: pausing deletes the runs the scheduler had created.
        client.pause_deployment(pipeline.id)

        # a run of the data deployment as the UI starts it, with a small corpus; a parameter that
        # does not fit the flow's signature is refused by the server, as the UI's form refuses it
        data = deployments["data"]
        with pytest.raises(PrefectHTTPStatusError, match="Error creating flow run"):
            client.create_flow_run_from_deployment(data.id, parameters={"profile": 3})
        overrides = small_corpus_overrides(tmp_path)
        flow_run = client.create_flow_run_from_deployment(data.id, parameters={"overrides": overrides})
        assert flow_run.parameters == {"profile": "smoke", "sources_file": None, "overrides": overrides}

    # The worker is started elsewhere and without S2S_ROOT: the pull step must change into the
    # project root, and the flows find params.yaml there. (Safe for the real checkout: the pull
    # directory was checked above, and from anywhere else the entrypoint would not even load.)
    worker_cwd = tmp_path / "worker-cwd"
    worker_cwd.mkdir()
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    worker_env.pop("S2S_ROOT", None)
    worker = Process([PREFECT, "worker", "start", "--pool", "s2s-process", "--limit", "1", "--name", "test-worker"],
                     tmp_path / "worker.log", worker_env, worker_cwd)
    with _client(api) as client:
        try:
            deadline = time.monotonic() + 600
            while not (run := client.read_flow_run(flow_run.id)).state.is_final():
                assert worker.popen.poll() is None, f"the worker exited\n{worker.tail()}"
                assert time.monotonic() < deadline, (
                    f"flow run still {run.state.name} after 600 s\n{worker.tail()}\n{_run_logs(client, run.id)}")
                time.sleep(3)
            assert run.state.is_completed(), (
                f"flow run ended {run.state.name}: {run.state.message}\n{worker.tail()}\n{_run_logs(client, run.id)}"
                f"\n{server.tail(3000)}")
        finally:
            worker.stop()
            run = client.read_flow_run(flow_run.id)
            if not run.state.is_final() and run.infrastructure_pid:
                # the flow-run process the worker started runs in a session of its own
                _signal_group(int(run.infrastructure_pid.rsplit(":", 1)[-1]), signal.SIGKILL)

        # it ran in the project root, on the deployment's flow, with the parameters given
        assert run.deployment_id == data.id and run.work_pool_name == "s2s-process"
        assert (project_root / "data" / "manifest.csv").is_file() and (project_root / "data.dvc").is_file()
        assert not any(worker_cwd.iterdir()), "nothing written where the worker was started"
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        assert {"data-summary", "data-validation", "data-quarantine"} <= {a.key for a in artifacts}
        # the worker picked this run and nothing else
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter())
        ran = [r for r in runs if r.state.type != StateType.SCHEDULED]
        assert [r.id for r in ran] == [run.id], [(r.name, r.state.name) for r in ran]
