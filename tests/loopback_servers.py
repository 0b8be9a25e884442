"""The team's servers on loopback, for the scaling tests (docs/scaling.md): a throwaway PostgreSQL
cluster, moto's standalone S3 server, an MLflow tracking server and a Prefect server.

Each is a real server process the test starts on a free 127.0.0.1 port and stops (its whole
process group) on exit; its log goes to a file whose tail is in the failure when it does not come
up. PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user (Debian's
package creates it) in a temp folder of its own, outside pytest's root-only tmp tree.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tasks.benchmarks.server_launcher import free_port

from .conftest import require_tool

BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class Process:
    """A subprocess in its own session with its output in a file; stop() ends the whole group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
                 user: str | None = None) -> None:
        self.args, self.log = args, log
        self._out = log.open("wb")
        kwargs = {"user": user} if user else {}
        self.popen = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)

    def tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {' '.join(Path(a).name for a in self.args[:4])} (rc={self.popen.poll()}) log tail ---\n{text[-chars:]}"

    def wait_until(self, ready: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
        """Poll `ready` until it holds; fail with the log tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not _quietly(ready):
            if self.popen.poll() is not None:
                raise AssertionError(f"{what} exited while starting\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} was not ready within {timeout_s:g} s\n{self.tail()}")
            time.sleep(0.5)

    def stop(self, grace_s: float = 20) -> None:
        stop_process(self.popen, grace_s, group=True)
        self._out.close()


def stop_process(popen: subprocess.Popen, grace_s: float = 120, group: bool = False) -> None:
    """SIGTERM (to its whole group with `group`: one started with start_new_session), wait up to
    `grace_s` for it to shut down cleanly, then SIGKILL; nothing is left running either way."""
    if popen.poll() is not None:
        return
    send = (lambda sig: _signal_group(popen.pid, sig)) if group else popen.send_signal
    send(signal.SIGTERM)
    try:
        popen.wait(grace_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        popen.wait(10)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group the process was started in (start_new_session)
    except ProcessLookupError:
        pass


def _quietly(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - not up yet
        return False


def http_ok(url: str) -> bool:
    """GET `url` straight (no proxy) and say whether it answered 200."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=3) as response:
        return response.status == 200


# ----------------------------------------------------------------------------------- PostgreSQL

def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    return found


@dataclass
class Postgres:
    port: int
    user: str
    createdb: Callable[[str], str]

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def postgres(log_dir: Path) -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on a free loopback port (trust auth, loopback only).

    `createdb(name)` makes a database and returns its SQLAlchemy URL (postgresql://...)."""
    initdb, pg_ctl, postgres_bin, createdb = (_pg_bin(n) for n in ("initdb", "pg_ctl", "postgres", "createdb"))
    require_tool("postgresql", all((initdb, pg_ctl, postgres_bin, createdb)), "the tracking and orchestration "
                 "servers of the scaling tests keep their state in PostgreSQL")
    run_as = None
    if os.geteuid() == 0:  # initdb and postgres refuse root
        run_as = "postgres" if _user_exists("postgres") else "nobody"
    home = Path(tempfile.mkdtemp(prefix="s2s-pg-"))
    data = home / "data"
    if run_as:
        entry = pwd.getpwnam(run_as)
        os.chown(home, entry.pw_uid, entry.pw_gid)
    user = "s2s"
    port = free_port()
    server: Process | None = None
    try:
        result = subprocess.run([initdb, "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync"],
                                capture_output=True, text=True, user=run_as, cwd=home)
        assert result.returncode == 0, f"initdb failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        server = Process([postgres_bin, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(home),
                          "-c", "fsync=off", "-c", "max_connections=200"], log_dir / "postgres.log", cwd=home,
                         user=run_as)

        def ready() -> bool:
            return subprocess.run([_pg_bin("pg_isready") or "pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                                  capture_output=True).returncode == 0

        server.wait_until(ready, "PostgreSQL", 120)

        def make(name: str) -> str:
            made = subprocess.run([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", user, name],
                                  capture_output=True, text=True)
            assert made.returncode == 0, f"createdb {name} failed: {made.stderr}"
            return f"postgresql://{user}@127.0.0.1:{port}/{name}"

        yield Postgres(port, user, make)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(home, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# ------------------------------------------------------------------------------------------- S3

@dataclass
class S3:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]})

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@contextlib.contextmanager
def moto_s3(log_dir: Path, buckets: tuple[str, ...] = ()) -> Iterator[S3]:
    """moto's standalone server as an S3 endpoint on loopback, with `buckets` created; the AWS_*
    test credentials are set in os.environ while it runs (the clients of the tests read them)."""
    port = free_port()
    server = Process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log_dir / "moto.log",
                     env={**os.environ, **S3_ENV})
    saved = {k: os.environ.get(k) for k in S3_ENV}
    try:
        endpoint = f"http://127.0.0.1:{port}"
        server.wait_until(lambda: http_ok(f"{endpoint}/moto-api/"), "moto_server", 120)
        os.environ.update(S3_ENV)
        s3 = S3(endpoint)
        for bucket in buckets:
            s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


# --------------------------------------------------------------------------------------- MLflow

@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: str, s3: S3, log_dir: Path) -> Iterator[str]:
    """`mlflow server` on the given backend store, serving the artifacts it keeps at `artifacts`
    (s3://...) through itself (--serve-artifacts): clients need no S3 access. Yields its URL."""
    port = free_port()
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = Process([str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
                      "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
                      "--workers", "1"], log_dir / "mlflow-server.log", env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_until(lambda: http_ok(f"{url}/health"), "mlflow server", 600)  # migrations: minutes on a busy runner
        yield url
    finally:
        server.stop()


# -------------------------------------------------------------------------------------- Prefect

def prefect_env(home: Path) -> dict[str, str]:
    """This environment without any PREFECT_* of the caller (a profile, an API URL), state in `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_CLI_PROMPT="false",
               PYTHONUNBUFFERED="1")
    return env


@contextlib.contextmanager
def prefect_server(database_url: str, log_dir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`prefect server start` on the given database (postgresql+asyncpg://...). Yields the API URL
    and the environment for its clients (PREFECT_API_URL set, no database of their own)."""
    home = log_dir / "prefect-server-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**prefect_env(home), "PREFECT_API_DATABASE_CONNECTION_URL": database_url}
    port = free_port()
    server = Process([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     log_dir / "prefect-server.log", env=env, cwd=log_dir)
    try:
        api = f"http://127.0.0.1:{port}/api"
        server.wait_until(lambda: http_ok(f"{api}/health"), "prefect server", 600)
        client_env = {k: v for k, v in env.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}
        client_env["PREFECT_API_URL"] = api
        yield api, client_env
    finally:
        server.stop()
