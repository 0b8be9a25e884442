"""The fault-injection suite, second part: processes that write the stores killed with SIGKILL
(the pipeline flow in each stage, a replica of the serving pool mid-reply) or blocked (MLflow's
SQLite file locked), then the stores checked: data/, data.dvc, the DVC cache and remote,
artifacts/ (checkpoints, bundles) and the MLflow registry agree, nothing half-written is read,
and no version is registered twice. Every case is `chaos`-marked: `s2s chaos` runs them and
writes docs/reliability.md (tests/chaos_report.py)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from . import loopback_servers
from .conftest import LENIENT, REPO, TINY, cli_sets, require_tool, small_corpus_overrides, speak
from .loopback_servers import Process, _signal_group, stop_process
from .test_deployments import PREFECT, _cli as prefect_cli, _client
from .test_deployments import prefect_server  # noqa: F401 - the fixture: a Prefect server on loopback

RNG = random.Random(int(os.environ.get("S2S_CHAOS_SEED", "17")) + 1)
KILLS = int(os.environ.get("S2S_CHAOS_KILLS", "3"))

# --- the pipeline flow killed in each stage -----------------------------------------------------------------

PIPELINE = """
import json, sys
from flows.pipeline_flow import pipeline_flow
result = pipeline_flow(profile="smoke", overrides=json.loads(sys.argv[1]), thresholds=json.loads(sys.argv[2]))
print("PIPELINE-RESULT " + json.dumps({"version": result["train"]["version"], "reused": result["train"]["reused"],
                                       "corpus_hash": result["corpus"]["corpus_hash"]}), flush=True)
"""
# stage -> the Prefect task whose start opens it (the flow logs "Created task run ... for task 'NAME'" at DEBUG)
STAGES = {"data": ("segment", "build-corpus", "version-corpus"), "codec": ("train-codec",),
          "tokens": ("train-s2s",), "s2s": ("train-s2s",), "evaluation": ("evaluate-quality", "measure-latency"),
          "gates/register": ("register",)}  # one of the stage's tasks is drawn
TASK_LINE = re.compile(r"Created task run '[^']*' for task '([^']+)'")


class FlowRun:
    """The pipeline flow in a subprocess of its own session, its log read line by line, so the
    test knows which task it is in; kill() is SIGKILL of the flow's process alone, as the kernel's
    OOM killer or a lost machine would end it (its children live or die on their own)."""

    def __init__(self, root: Path, env: dict[str, str], overrides: dict, log: Path) -> None:
        self.tasks: list[str] = []
        self.lines: list[str] = []
        self.log = log.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PIPELINE), json.dumps(overrides), json.dumps(LENIENT)], cwd=root,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self.log.write(line)
            if match := TASK_LINE.search(line):
                self.tasks.append(match.group(1))

    def wait_for_task(self, names: tuple[str, ...], timeout: float = 1800) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(t in names for t in self.tasks):
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.05)
        raise AssertionError(f"no task {names} within {timeout:g} s; tasks so far {self.tasks}\n{self.tail()}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.reader.join(10)
        self.log.flush()

    def finish(self, timeout: float = 3600) -> dict:
        self.process.wait(timeout)
        self.reader.join(10)
        self.log.flush()
        assert self.process.returncode == 0, f"the rerun failed (rc={self.process.returncode})\n{self.tail()}"
        [result] = [json.loads(l.split(" ", 1)[1]) for l in self.lines if l.startswith("PIPELINE-RESULT ")]
        return result

    def tail(self, lines: int = 60) -> str:
        return "".join(l for l in self.lines if "DEBUG" not in l)[-8000:] or "".join(self.lines[-lines:])


def _loadable_checkpoints(root: Path) -> list[str]:
    """The checkpoints under artifacts/ that do not load (a half-written one read back)."""
    import torch

    broken = []
    for path in sorted((root / "artifacts").rglob("*.pt")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # a temporary of core.atomic: never read by name
        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - anything unreadable counts
            broken.append(f"{path.relative_to(root)}: {type(exc).__name__}: {exc}"[:300])
    return broken


def _broken_bundles(root: Path) -> list[str]:
    from serving.bundle import load_bundle_dir

    broken = []
    for meta in sorted((root / "artifacts").rglob("bundle.json")):
        if any(part.startswith(".") for part in meta.relative_to(root).parts):
            continue
        if meta.parent.parent == root / "artifacts" / "publish":  # the Hub repos (codec, s2s), not bundles
            continue
        try:
            load_bundle_dir(meta.parent)  # verifies each weight file against its sha256
        except Exception as exc:  # noqa: BLE001
            broken.append(f"{meta.parent.relative_to(root)}: {exc}"[:300])
    return broken


def _broken_corpus(root: Path) -> list[str]:
    """data/ as a reader sees it: the manifest's every file there, pairs.jsonl whole."""
    import pandas as pd

    data = root / "data"
    if not (data / "manifest.csv").exists():
        return [] if not data.exists() or not any(data.iterdir()) else ["data/ without manifest.csv"]
    manifest = pd.read_csv(data / "manifest.csv")
    missing = [p for p in manifest["path"] if not (data / p).is_file()]
    try:
        [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        missing.append(f"pairs.jsonl: {exc}")
    return missing


def _registry(root: Path) -> list[tuple[str, dict]]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    if not (root / "mlflow" / "mlflow.db").exists():
        return []
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        versions = client.search_model_versions("name = 'telugu-s2s'")
    except Exception:  # noqa: BLE001 - no registered model yet
        return []
    return sorted((str(v.version), dict(v.tags)) for v in versions)


def _dvc_consistent(root: Path) -> tuple[list[str], str]:
    """What is missing from the DVC cache and the remote for data.dvc; and data.dvc's md5."""
    import yaml

    from tasks.data.version import dvc

    md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    status = dvc(root, "status", "data.dvc")
    lost = [] if "up to date" in status else [f"dvc status: {status.strip()[:300]}"]
    cache = root / ".dvc" / "cache" / "files" / "md5"
    listing = cache / md5[:2] / md5[2:]
    if not listing.is_file():
        return lost + [f"cache lacks the .dir listing {md5}"], md5
    for entry in json.loads(listing.read_text()):
        if not (cache / entry["md5"][:2] / entry["md5"][2:]).is_file():
            lost.append(f"cache lacks {entry['relpath']}")
    remote = root.parent / "dvc-remote" / "files" / "md5"
    if not (remote / md5[:2] / md5[2:]).is_file():
        lost.append(f"remote lacks the .dir listing {md5}")
    return lost, md5


def _survivors(pgid: int) -> list[str]:
    """Processes still in the killed flow's session (its pinned child, a dvc or ffmpeg it started)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == pgid and fields[0] != "Z":  # fields: state ppid pgrp ...
            found.append(status.parent.name)
    return found


def _unfinished_training(root: Path) -> dict[str, int]:
    """Stage -> step of last.pt for each training a kill left unfinished (a checkpoint, no stamp.json:
    a finished run writes its stamp last), which the next run must continue, not start over."""
    import torch

    left = {}
    for stage in ("codec", "s2s"):
        folder = root / "artifacts" / stage
        if (folder / "last.pt").is_file() and not (folder / "stamp.json").is_file():
            left[stage] = torch.load(folder / "last.pt", map_location="cpu", weights_only=False)["step"]
    return left


def _last_step(metrics: Path) -> int:
    """The last step metrics.jsonl has (0 when none; a line being appended is not counted)."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def _checkpoint_written_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except FileNotFoundError:
        return False


@pytest.mark.chaos
@pytest.mark.timeout(7200)
def test_the_pipeline_killed_in_each_stage_reruns_to_consistent_stores(project_root: Path, tmp_path: Path, chaos,
                                                                       monkeypatch: pytest.MonkeyPatch):
    """One workspace, the pipeline flow SIGKILLed once in each stage (data, codec, tokens, s2s,
    evaluation, gates/register; at a random moment after the stage's task starts, in codec and s2s
    after the run's first checkpoint), each kill followed by a rerun that is killed in the next
    stage, then a rerun that completes and one more that must find the same version. After every
    kill: every checkpoint and bundle on disk loads, data/ is whole, the registry holds no weights
    twice, no process of the killed run lives on; a training the kill left unfinished is continued
    by the next run from its checkpoint (tasks/training/resume.py), not started over; at the end
    data.dvc, the DVC cache and remote and the registered version's corpus_hash agree."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    overrides = {**small_corpus_overrides(tmp_path), **TINY,
                 "splits": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 15}}
    (tmp_path / "prefect").mkdir()
    with loopback_servers.prefect_server(f"sqlite+aiosqlite:///{tmp_path / 'prefect' / 'prefect.db'}",
                                         tmp_path / "prefect") as (_api, prefect_env):
        env = {**prefect_env, "S2S_ROOT": str(project_root), "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "DEBUG",
               "MLFLOW_TRACKING_URI": f"sqlite:///{project_root / 'mlflow' / 'mlflow.db'}"}
        log = tmp_path / "pipeline.log"
        row = chaos.row("kill -9 of the pipeline flow in each stage (data, codec, tokens, s2s, evaluation, "
                        "gates/register), each followed by a rerun",
                        "after each kill every checkpoint and bundle loads, data/ is whole, no weights registered "
                        "twice, no process of the killed run left; a training left unfinished is continued by the "
                        "rerun from its checkpoint; the last rerun completes; data.dvc, DVC cache, remote and the "
                        "version's corpus hash agree; one more run reuses the version (seconds: rerun start to past "
                        "the stage killed before)")
        killed_in: list[str] = []
        resumed: list[str] = []
        unfinished: dict[str, int] = {}
        for stage, names in STAGES.items():
            started, wall = time.monotonic(), time.time()
            run = FlowRun(project_root, env, overrides, log)
            if not run.wait_for_task((RNG.choice(names),)):
                pytest.fail(f"the run ended before stage {stage}\n{run.tail()}")
            if stage != "data" and killed_in:
                row.recover_seconds.append(time.monotonic() - started)  # the rerun got past the last kill
            if stage in ("codec", "s2s"):  # at a random step past this run's first checkpoint
                settings = TINY[f"{stage}_train"]
                target = RNG.randint(settings["checkpoint_every"] + 1, settings["max_steps"] - 1)
                folder = project_root / "artifacts" / stage
                while run.process.poll() is None and not (_checkpoint_written_since(folder / "last.pt", wall)
                                                          and _last_step(folder / "metrics.jsonl") >= target):
                    time.sleep(0.005)
            else:
                time.sleep(RNG.uniform(0.0, {"tokens": 1.5, "gates/register": 6.0}.get(stage, 4.0)))
            assert run.process.poll() is None, f"the run ended before the kill in {stage}\n{run.tail()}"
            stages_seen = list(run.tasks)
            run.kill()
            for trained, step in unfinished.items():  # what the kill before left, this run had to continue
                said = "".join(run.lines)
                assert f"{trained} training continues {project_root / 'artifacts' / trained / 'last.pt'} at step " \
                       f"{step}" in said and f"{trained} training starts over" not in said, \
                    f"the run after the kill did not continue {trained} from step {step}\n{run.tail()}"
                resumed.append(f"{trained} from step {step}")
            row.injected += 1
            killed_in.append(f"{stage} ({stages_seen[-1]})")
            broken = _loadable_checkpoints(project_root) + _broken_bundles(project_root) + _broken_corpus(project_root)
            row.corrupt_read += len(broken)
            assert not broken, f"after the kill in {stage}: {broken}"
            shas = [tags.get("bundle_sha") for _, tags in _registry(project_root)]
            assert len(shas) == len(set(shas)) and None not in shas, f"after the kill in {stage}: {_registry(project_root)}"
            time.sleep(1)
            leftover = _survivors(run.process.pid)
            deadline = time.monotonic() + 120  # a dvc command it had started may finish its step
            while leftover and time.monotonic() < deadline:
                time.sleep(0.5)
                leftover = _survivors(run.process.pid)
            assert not leftover, f"processes of the killed flow still run: {leftover}"
            unfinished = {k: v for k, v in _unfinished_training(project_root).items() if v > 0}

        started = time.monotonic()
        final = FlowRun(project_root, env, overrides, log)
        result = final.finish()
        row.recover_seconds.append(time.monotonic() - started)
        for trained, step in unfinished.items():
            assert f"{trained} training continues" in "".join(final.lines), f"{trained} was not continued"
            resumed.append(f"{trained} from step {step}")
        versions = _registry(project_root)
        assert [v for v, _ in versions] == [result["version"]] == ["1"], versions
        tags = versions[0][1]
        assert tags.get("registration") == "complete" and tags.get("gates_passed") == "true", tags
        lost, md5 = _dvc_consistent(project_root)
        row.artifacts_lost += len(lost)
        assert not lost, lost
        assert result["corpus_hash"] == md5 == tags.get("corpus_hash"), (result, md5, tags.get("corpus_hash"))
        again = FlowRun(project_root, env, overrides, log).finish()
        assert again["version"] == "1" and again["reused"], again
        assert [v for v, _ in _registry(project_root)] == ["1"], "the same weights were registered twice"
        assert any(r.startswith("codec") for r in resumed) and any(r.startswith("s2s") for r in resumed), resumed
        row.recovered += len(killed_in)
        row.note = row.note.split("; killed in:")[0] + f"; killed in: {', '.join(killed_in)}; training continued: " \
                                                      f"{', '.join(resumed)}"


# --- a Prefect worker killed while it runs a deployment's flow ---------------------------------------------

def _infrastructure_pid(run) -> int | None:
    """The pid of the flow-run process a process worker started ("host:pid"), once it reported it."""
    return int(str(run.infrastructure_pid).rsplit(":", 1)[-1]) if run.infrastructure_pid else None


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_a_worker_killed_mid_run_through_a_deployment(project_root: Path, tmp_path: Path,
                                                       prefect_server, chaos):  # noqa: F811
    """The data deployment run by a process worker, SIGKILLed at a random moment of its run:
    (a) the worker alone: the flow-run process it started lives on in its own session, completes
    the run and exits; (b) the worker and that process (the machine lost), on a corpus to rebuild:
    nothing of the lost run lives on, and a new run on a new worker completes (after the writer
    slot's lease frees) with data/ whole and data.dvc, the DVC cache and the remote in agreement."""
    import shutil

    api, env, _server = prefect_server
    shutil.copy(REPO / "prefect.yaml", project_root / "prefect.yaml")
    shutil.copytree(REPO / "flows", project_root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    prefect_cli(["work-pool", "create", "s2s-process", "--type", "process"], env, project_root, timeout=300)
    prefect_cli(["deploy", "--all", "--no-prompt"], env, project_root, timeout=600)
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "DEBUG", "OMP_NUM_THREADS": "1"}
    worker_env.pop("S2S_ROOT", None)
    row = chaos.row("kill -9 of a Prefect process worker running the data deployment (a: the worker; b: the "
                    "worker and its flow-run process)",
                    "a: the flow-run process finishes the run and exits; b: nothing of the lost run lives on, a new "
                    "run on a new worker completes; data/ whole, data.dvc = DVC cache = remote (seconds: kill to the "
                    "run completed)")
    started_pids: list[int] = []
    with _client(api) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        client.pause_deployment(deployments["pipeline"].id)  # only the runs started here
        try:
            for case, exchanges in (("worker", 4), ("worker and flow run", 5)):  # (b) has a corpus to rebuild
                overrides = {**small_corpus_overrides(tmp_path), "corpus": {"episodes": 3,
                                                                            "exchanges_per_episode": exchanges}}
                flow_run = client.create_flow_run_from_deployment(deployments["data"].id,
                                                                  parameters={"overrides": overrides})
                log = tmp_path / f"worker-{case.replace(' ', '-')}.log"
                worker = Process([PREFECT, "worker", "start", "--pool", "s2s-process", "--limit", "1"], log,
                                 worker_env, tmp_path)
                deadline = time.monotonic() + 1800  # its output is not the worker's (prefect.yaml): ask the server
                while not client.read_flow_run(flow_run.id).state.is_running():
                    assert worker.popen.poll() is None and time.monotonic() < deadline, worker.tail()
                    time.sleep(0.2)
                time.sleep(RNG.uniform(0.0, 20.0))
                run = client.read_flow_run(flow_run.id)
                assert run.state.is_running(), f"{case}: {run.state.name}\n{worker.tail()}"
                flow_pid = _infrastructure_pid(run)
                assert flow_pid, f"{case}: the worker reported no flow-run process"
                started_pids.append(flow_pid)
                assert os.getpgid(flow_pid) == flow_pid, "the flow-run process leads a group of its own"
                worker.popen.send_signal(signal.SIGKILL)
                worker.popen.wait()
                started = time.monotonic()
                if case == "worker and flow run":
                    _signal_group(flow_pid, signal.SIGKILL)
                row.injected += 1
                broken = _broken_corpus(project_root)
                row.corrupt_read += len(broken)
                assert not broken, broken
                if case == "worker and flow run":
                    deadline = time.monotonic() + 120  # a dvc command it had started may finish its step
                    while (leftover := _survivors(flow_pid)) and time.monotonic() < deadline:
                        time.sleep(0.5)
                    assert not leftover, f"processes of the lost flow run still run: {leftover}"
                    lost_state = client.read_flow_run(flow_run.id).state.name
                    row.note = row.note.split(" (the lost run")[0] + f" (the lost run's state after it: {lost_state})"
                    flow_run = client.create_flow_run_from_deployment(deployments["data"].id,
                                                                      parameters={"overrides": overrides})
                    worker = Process([PREFECT, "worker", "start", "--pool", "s2s-process", "--limit", "1"],
                                     tmp_path / "worker-again.log", worker_env, tmp_path)
                try:
                    deadline = time.monotonic() + 1800
                    while not (run := client.read_flow_run(flow_run.id)).state.is_final():
                        assert time.monotonic() < deadline, f"{case}: still {run.state.name}\n{worker.tail()}"
                        time.sleep(2)
                finally:
                    worker.stop()
                assert run.state.is_completed(), f"{case}: {run.state.name} {run.state.message}\n{worker.tail()}"
                row.recover_seconds.append(time.monotonic() - started)
                if case == "worker":  # the orphaned flow-run process ends with its run
                    deadline = time.monotonic() + 60
                    while (leftover := _survivors(flow_pid)) and time.monotonic() < deadline:
                        time.sleep(0.5)
                    assert not leftover, f"the flow-run process outlived its run: {leftover}"
                broken = _broken_corpus(project_root)
                lost, _ = _dvc_consistent(project_root)
                row.corrupt_read += len(broken)
                row.artifacts_lost += len(lost)
                assert not broken and not lost, (broken, lost)
                row.recovered += 1
        finally:  # nothing this case started lives on, whatever failed
            for pid in started_pids:
                _signal_group(pid, signal.SIGKILL)


# --- the MLflow store locked during a run --------------------------------------------------------------------

LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("BEGIN EXCLUSIVE")  # what a long migration or a stuck writer holds: no other writer or reader
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "s2s.cli", *args]


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_a_locked_mlflow_store_fails_the_run_clearly_and_the_next_run_works(tiny_corpus: Path, project_root: Path,
                                                                           chaos):
    """Another process holds an exclusive lock on mlflow.db: while training starts, and from a
    random step of a running training on. Each run ends with exit 2 and one line naming the store
    (no traceback), after retrying for mlflow.lock_wait_s; its MLflow run is not left RUNNING with
    anything registered from it; with the lock gone the next run logs and finishes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    db = project_root / "mlflow" / "mlflow.db"
    base = ["train", "codec", *cli_sets(TINY), "--set=codec_train.max_steps=40", "--set=mlflow.lock_wait_s=5"]
    subprocess.run(_cli(*base, "--set=codec_train.max_steps=1", "--set=codec_train.out_dir=artifacts/warm"),
                   env=env, check=True, capture_output=True, cwd=project_root, timeout=900)  # creates mlflow.db
    row = chaos.row("MLflow's SQLite store locked by another process (at the start, and from a random step)",
                    "exit 2 and one line naming the store after the configured wait, no traceback; nothing left "
                    "RUNNING; the next run logs and finishes")
    for when in ("start", "mid-run"):
        out = f"--set=codec_train.out_dir=artifacts/locked-{when}"
        locker = None
        if when == "start":
            locker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOCKER), str(db), "600"],
                                      stdout=subprocess.PIPE, text=True)
            assert locker.stdout.readline().strip() == "locked"
        training = subprocess.Popen(_cli(*base, out), env=env, cwd=project_root, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        if when == "mid-run":
            metrics = project_root / "artifacts" / f"locked-{when}" / "metrics.jsonl"
            target = RNG.randint(1, 8)
            while training.poll() is None and len(metrics.read_text().splitlines() if metrics.is_file() else []) < target:
                time.sleep(0.02)
            locker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOCKER), str(db), "600"],
                                      stdout=subprocess.PIPE, text=True)
            assert locker.stdout.readline().strip() == "locked"
        try:
            output, _ = training.communicate(timeout=900)
        finally:
            locker.kill()
            locker.wait()
        row.injected += 1
        assert training.returncode == 2, f"{when}: rc={training.returncode}\n{output[-3000:]}"
        assert f"the MLflow store sqlite:///{db} cannot be used" in output and "locked" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        started = time.monotonic()
        subprocess.run(_cli(*base, out, "--set=codec_train.max_steps=4"), env=env, check=True, capture_output=True,
                       cwd=project_root, timeout=900)
        row.recover_seconds.append(time.monotonic() - started)
        row.recovered += 1
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    statuses = sorted(r.info.status for r in runs)
    assert "RUNNING" not in statuses, statuses
    assert statuses.count("FINISHED") == 3, statuses  # the warm-up and the two runs after the lock
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from model_versions").fetchone()[0] == 0


# --- a replica behind the balancer killed mid-reply -------------------------------------------------------------

def _talk(url: str, pcm: bytes, on_first_audio=None) -> str:
    from .test_chaos import _talk as talk

    return talk(url, pcm, on_first_audio)


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_a_replica_killed_mid_reply_behind_the_balancer(bundle_dir: Path, tmp_path: Path, chaos):
    """`s2s serve-pool start` with 2 replicas; the replica holding a session is SIGKILLed when the reply's
    first audio arrives: that client sees a close (not a hang), sessions opened right after (before
    HAProxy's checks mark it down) are served whole by the other replica, and the pool starts the
    killed one again on its port."""
    import shutil

    from serving.haproxy import HAProxyAdmin
    from serving.pool import health
    from tasks.benchmarks.server_launcher import free_port

    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    require_tool("haproxy", haproxy is not None, "the balancer of `s2s serve-pool`")
    folder, port = tmp_path / "pool", free_port()
    pool = subprocess.Popen(
        _cli("serve-pool", "start", "--replicas", "2", "--port", str(port), "--model", str(bundle_dir), "--dir",
             str(folder), "--set=serving.max_reply_seconds=2.0", "--set=serving.min_reply_seconds=1.0"),
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pcm = (np.clip(speak("నువ్వు ఈ రోజు ఏమి తిన్నావు?"), -1, 1) * 32767).astype("<i2").tobytes()
    url = f"ws://127.0.0.1:{port}/ws"
    row = chaos.row("a replica of `s2s serve-pool start` (2 replicas, HAProxy) killed -9 mid-reply",
                    "its client sees a close, not a hang; 2 sessions opened at once after are served whole by the "
                    "other; the pool restarts the killed replica (seconds: kill to its /healthz ok)")

    def state() -> dict:
        path = folder / "pool.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    try:
        deadline = time.monotonic() + 600
        while state().get("status") != "ready":
            assert pool.poll() is None, f"the pool exited: {pool.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the pool was not ready within 600 s"
            time.sleep(0.5)
        admin = HAProxyAdmin(Path(state()["admin_socket"]))
        for _ in range(KILLS):
            victim: dict = {}

            def kill() -> None:
                busy = [n for n, s in admin.servers().items() if int(s.get("scur") or 0) > 0]
                [replica] = [r for r in state()["replicas"] if r["name"] == busy[0]]
                os.kill(replica["pid"], signal.SIGKILL)
                victim.update(replica, at=time.monotonic())

            assert _talk(url, pcm, on_first_audio=kill) == "closed", "the killed replica's client sees a close"
            row.injected += 1
            outcomes: list[str] = []

            def session() -> None:
                try:
                    outcomes.append(_talk(url, pcm))
                except Exception as exc:  # noqa: BLE001 - the outcome names what went wrong
                    outcomes.append(f"{type(exc).__name__}: {exc}"[:300])

            threads = [threading.Thread(target=session) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
            assert outcomes == ["reply", "reply"], f"sessions right after the kill: {outcomes} (a missing one hung)"
            while True:  # the pool starts the killed replica again
                replica = next(r for r in state()["replicas"] if r["name"] == victim["name"])
                if replica["pid"] != victim["pid"] and health("127.0.0.1", replica["port"])[0] == 200:
                    break
                assert pool.poll() is None, f"the pool exited: {pool.stdout.read()[-3000:]}"
                assert time.monotonic() - victim["at"] < 600, "the killed replica was not started again"
                time.sleep(0.2)
            row.recover_seconds.append(time.monotonic() - victim["at"])
            row.recovered += 1
            deadline = time.monotonic() + 60
            while admin.servers()[victim["name"]]["status"].split(" ")[0] != "UP":
                assert time.monotonic() < deadline, "HAProxy did not take the restarted replica back"
                time.sleep(0.2)
        assert state()["restarts"] == KILLS
    finally:
        stop_process(pool)
