"""The fault-injection suite, second part: the MLflow store locked under a running training, and
a replica of the serving pool killed with SIGKILL mid-reply. Every case is `chaos`-marked:
`s2s chaos` runs them and writes docs/reliability.md (tests/chaos_report.py)."""

from __future__ import annotations

import json
import os
import random
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

from .conftest import TINY, cli_sets, require_tool, speak

RNG = random.Random(int(os.environ.get("S2S_CHAOS_SEED", "17")) + 1)
KILLS = int(os.environ.get("S2S_CHAOS_KILLS", "3"))

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
        pool.send_signal(signal.SIGTERM)
        try:
            pool.wait(120)
        except subprocess.TimeoutExpired:
            pool.kill()
