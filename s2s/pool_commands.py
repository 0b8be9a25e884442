"""`s2s serve-pool start|roll|status`: `s2s serve` replicas behind HAProxy (serving/pool.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import typer

from s2s.common import ProfileOpt, SetOpt, _fail, _params, app, console

pool_app = typer.Typer(help="Several `s2s serve` replicas behind HAProxy: start, rolling restart, status.",
                       no_args_is_help=True)
app.add_typer(pool_app, name="serve-pool")

DirOpt = typer.Option(None, "--dir", help="the pool's folder (state pool.json, haproxy.cfg, logs; "
                                          "default: <artifacts>/serve-pool)")


def _folder(params, folder: Optional[Path]) -> Path:
    return folder.resolve() if folder else params.path(params.paths.artifacts) / "serve-pool"


@pool_app.command("start")
def start_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
              replicas: int = typer.Option(2, help="`s2s serve` replicas (ports port+1..port+N)"),
              model: Optional[str] = typer.Option(None, help="what every replica serves (default: serving.model, "
                                                               "models:/telugu-s2s@champion)"),
              host: Optional[str] = typer.Option(None, help="HAProxy's address (default: serving.host)"),
              port: Optional[int] = typer.Option(None, help="HAProxy's port (default: serving.port)"),
              session_drain: float = typer.Option(600.0, help="seconds a draining replica lets live sessions "
                                                              "go on (serving.session_drain_s of the replicas)"),
              folder: Optional[Path] = DirOpt) -> None:
    """Start the replicas and HAProxy (leastconn on /ws) and run until SIGTERM; SIGHUP (or
    `s2s serve-pool roll`) restarts the replicas one by one onto the model serving.model names now."""
    from serving.pool import PoolError, ReplicaPool

    params = _params(profile, set_)
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if haproxy is None:
        _fail("haproxy is not installed: apt-get install haproxy (scripts/setup.sh installs it)")
    serve_args = [*(["--profile", profile] if profile else []), *[f"--set={s}" for s in set_ or []],
                  f"--set=serving.session_drain_s={session_drain}", *(["--model", model] if model else [])]
    pool = ReplicaPool(_folder(params, folder), replicas, serve_args, host or params.serving.host,
                       port or params.serving.port, session_seconds=params.serving.max_session_seconds,
                       max_sessions=params.serving.max_sessions,
                       drain_timeout_s=session_drain + params.serving.shutdown_grace_s + 60, haproxy=haproxy)
    console.print(f"serve-pool: {replicas} replica(s) behind HAProxy at {pool.url} "
                  f"(state: {pool.folder / 'pool.json'})", soft_wrap=True)
    try:
        pool.run()
    except PoolError as exc:
        _fail(str(exc))


@pool_app.command("roll")
def roll_cmd(profile: Optional[str] = ProfileOpt, folder: Optional[Path] = DirOpt,
             timeout: float = typer.Option(1800.0, help="seconds to wait for the roll (live sessions drain "
                                                        "first)")) -> None:
    """Rolling restart of a running pool: each replica drains (live sessions finish) and comes back
    with the model serving.model names now (a new champion), one at a time."""
    from serving.pool import PoolError, request_roll

    params = _params(profile, None)
    try:
        roll = request_roll(_folder(params, folder), timeout)
    except PoolError as exc:
        _fail(str(exc))
    if not roll.get("ok"):
        _fail(f"the roll failed: {roll.get('error')}")
    for step in roll["steps"]:
        console.print(f"{step['replica']}: drained in {step['drain_s']} s, back in {step['restart_s']} s, "
                      f"serving {step['model']}", soft_wrap=True)
    console.print(f"rolled in {roll['seconds']} s")


@pool_app.command("status")
def status_cmd(profile: Optional[str] = ProfileOpt, folder: Optional[Path] = DirOpt) -> None:
    """The pool's state (pool.json) and what HAProxy reports for each replica."""
    from serving.haproxy import HAProxyAdmin

    path = _folder(_params(profile, None), folder) / "pool.json"
    if not path.is_file():
        _fail(f"no pool state at {path}")
    state = json.loads(path.read_text())
    try:
        servers = HAProxyAdmin(Path(state["admin_socket"])).servers()
    except OSError:
        servers = {}
    console.print(f"{state['status']} at {state['url']}, {state['rolls']} roll(s)")
    for replica in state["replicas"]:
        row = servers.get(replica["name"], {})
        console.print(f"{replica['name']}: port {replica['port']}, pid {replica['pid']}, "
                      f"haproxy {row.get('status', '?')}, {row.get('scur', '?')} live connection(s)")
