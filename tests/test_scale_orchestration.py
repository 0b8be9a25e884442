"""Orchestration for a team (docs/scaling.md, "Orchestration").

- The one-writer rule is a Prefect concurrency limit the flows take (flows/one_writer.py): two
  flow runs at once on one server run their bodies one after the other, and a subflow runs inside
  its parent's slot (quick, on the test harness's server).
- scripts/deploy_revision.sh refuses a dirty checkout and a commit origin lacks (quick, git only).
- `scale` (minutes; `pytest -m scale tests/test_scale_orchestration.py`): the Prefect server on
  PostgreSQL, the deployments of prefect-team.yaml (pull step: git clone of the deployed
  revision), two workers started without --limit in two folders, two data runs submitted: both
  complete, their bodies never overlap, and each ran from a clone of the revision.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import REPO, small_corpus_overrides
from .loopback_servers import BIN, Process, postgres, prefect_server

PREFECT = str(BIN / "prefect")


def test_flow_runs_take_turns_on_the_writer_slot(prefect_harness):
    from prefect import flow

    from flows.one_writer import holds_writer_slot

    spans: dict[str, tuple[float, float]] = {}

    @flow
    def inner(name: str) -> str:  # a subflow: runs inside its parent's slot instead of waiting for it
        return name

    @flow
    @holds_writer_slot
    def writer(name: str) -> str:
        start = time.monotonic()
        time.sleep(1.0)
        inner(name)
        spans[name] = (start, time.monotonic())
        return name

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(spans) == {"a", "b"}, "both runs finished"
    first, second = sorted(spans.values())
    assert first[1] <= second[0], f"the bodies overlapped: {spans}"
    assert writer.fn("plain") == "plain", "outside a flow run (a plain call) there is nothing to hold"


def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    assert not check or result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result


def _team_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """origin (a bare repository of this project's HEAD) and a checkout of it to deploy from."""
    origin = tmp_path / "origin.git"
    _git(tmp_path, "clone", "-q", "--bare", str(REPO), str(origin))
    checkout = tmp_path / "deployer"
    _git(tmp_path, "clone", "-q", str(origin), str(checkout))
    _git(checkout, "config", "user.email", "ci@example.invalid")
    _git(checkout, "config", "user.name", "ci")
    return origin, checkout


def test_deploy_revision_refuses_what_workers_could_not_clone(tmp_path: Path):
    _, checkout = _team_checkout(tmp_path)
    script = ["bash", "scripts/deploy_revision.sh"]
    clean = subprocess.run(script, cwd=checkout, capture_output=True, text=True)
    assert clean.returncode == 0 and clean.stdout.strip() == _git(checkout, "rev-parse", "HEAD").stdout.strip()

    (checkout / "params.yaml").write_text((checkout / "params.yaml").read_text() + "\n# local edit\n")
    dirty = subprocess.run(script, cwd=checkout, capture_output=True, text=True)
    assert dirty.returncode == 1 and "uncommitted changes" in dirty.stderr

    _git(checkout, "commit", "-qam", "not pushed")
    unpushed = subprocess.run(script, cwd=checkout, capture_output=True, text=True)
    assert unpushed.returncode == 1 and "is not on origin" in unpushed.stderr and "push it first" in unpushed.stderr


@pytest.mark.scale
def test_two_workers_on_postgres_prefect_run_cloned_revisions_one_writer_at_a_time(tmp_path: Path):
    import yaml

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    logs = tmp_path / "logs"
    logs.mkdir()
    origin, checkout = _team_checkout(tmp_path)
    revision = _git(checkout, "rev-parse", "HEAD").stdout.strip()
    team, local = (yaml.safe_load((REPO / f).read_text())["deployments"] for f in ("prefect-team.yaml", "prefect.yaml"))
    for deployment, same in zip(team, local):  # runs in the worker's folder, where the clone stays between runs
        assert deployment["work_pool"].pop("job_variables") == {**same["work_pool"].pop("job_variables"),
                                                                "working_dir": "."}
    assert team == local, "prefect-team.yaml deploys what prefect.yaml deploys"

    with postgres(logs) as pg:
        database = pg.createdb("prefect").replace("postgresql://", "postgresql+asyncpg://")
        with prefect_server(database, logs) as (api, env):
            def cli(*args: str) -> str:
                done = subprocess.run([PREFECT, *args], cwd=checkout, env=env, capture_output=True, text=True,
                                      timeout=300)
                assert done.returncode == 0, f"prefect {' '.join(args)}:\n{(done.stdout + done.stderr)[-6000:]}"
                return done.stdout

            cli("work-pool", "create", "s2s-process", "--type", "process")
            cli("deploy", "--all", "--no-prompt", "--prefect-file", "prefect-team.yaml")
            machines = [tmp_path / f"machine-{i}" for i in (1, 2)]
            worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}
            worker_env.pop("S2S_ROOT", None)
            worker_env.pop("MLFLOW_TRACKING_URI", None)
            workers = []
            for i, machine in enumerate(machines, 1):
                machine.mkdir()
                workers.append(Process([PREFECT, "worker", "start", "--pool", "s2s-process", "--name", f"w{i}"],
                                       logs / f"worker-{i}.log", env=worker_env, cwd=machine))
            try:
                with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
                    deployment = client.read_deployment_by_name("data/data")
                    (step,) = deployment.pull_steps
                    clone = step["prefect.deployments.steps.git_clone"]
                    assert clone == {"repository": str(origin), "commit_sha": revision}, step
                    assert deployment.job_variables == {"working_dir": ".", "stream_output": False}
                    overrides = small_corpus_overrides(tmp_path)
                    runs = [client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": overrides})
                            for _ in range(2)]
                    ids = [r.id for r in runs]
                    deadline = time.monotonic() + 1200
                    while True:
                        states = [client.read_flow_run(i) for i in ids]
                        if all(r.state.is_final() for r in states):
                            break
                        for worker in workers:
                            assert worker.popen.poll() is None, f"a worker exited\n{worker.tail()}"
                        assert time.monotonic() < deadline, [r.state.name for r in states]
                        time.sleep(3)
                    for run in states:
                        assert run.state.is_completed(), (f"{run.name} ended {run.state.name}: {run.state.message}\n"
                                                          + "\n".join(w.tail() for w in workers))
                    bodies = []
                    for run in states:
                        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
                        assert tasks, run.name
                        bodies.append((min(t.start_time for t in tasks if t.start_time),
                                       max(t.end_time for t in tasks if t.end_time)))
                    (first, second) = sorted(bodies)
                    assert first[1] <= second[0], f"the two runs wrote at the same time: {bodies}"
                    # both were running at once (the workers took both), so it was the slot that held one back
                    spans = sorted((r.start_time, r.end_time) for r in states)
                    assert spans[0][1] > spans[1][0], f"the runs did not run at once: {spans}"
            finally:
                for worker in workers:
                    worker.stop()
    clones = [m / "origin" for m in machines if (m / "origin").is_dir()]
    assert clones, [list(m.iterdir()) for m in machines]
    for clone in clones:
        assert _git(clone, "rev-parse", "HEAD").stdout.strip() == revision
    assert any((c / "data" / "manifest.csv").is_file() for c in clones), "the flow ran in the clone"
