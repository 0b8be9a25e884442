"""HAProxy in front of `s2s serve` replicas: its configuration, and its runtime API.

Why these settings: a WebSocket session is one long connection, so the balancer counts live
connections (`balance leastconn`) rather than requests; `timeout tunnel` lets an upgraded
connection stay open as long as a session may (serving.max_session_seconds). Each replica is
checked on /healthz, which answers 503 while it drains or once its engine thread has died, so
HAProxy stops sending new sessions there; nothing shuts down the sessions a replica already holds
(no `on-marked-down shutdown-sessions`), which is what lets a draining replica finish them. A
replica that died (kill -9, out of memory) is seen by the checks only after `fall` of them (~1 s):
a new session sent there meanwhile has its refused connection retried on another replica
(`retries` + `option redispatch`) instead of getting a 503. A connection can also land in the
few milliseconds while the killed process's sockets are being closed: it is accepted, then reset
before any reply, which HAProxy answers with a 502 unless it also retries an empty response
(`retry-on ... empty-response`; safe here: a WebSocket handshake that got no answer started
nothing). Sessions that end abnormally (a 502, a timeout) are logged to the pool's haproxy.log
(`option dontlog-normal`: the others are not, so the file stays small). The
runtime API (an admin socket) lets the pool put a replica in DRAIN before it is told to stop,
so not one new session reaches it between the signal and the next health check.
"""

from __future__ import annotations

import csv
import io
import socket
from pathlib import Path

BACKEND = "replicas"


def haproxy_config(listen_host: str, listen_port: int, servers: dict[str, tuple[str, int]], admin_socket: Path,
                   session_seconds: float, max_sessions: int, check_interval_ms: int = 500) -> str:
    """haproxy.cfg text: one frontend, one leastconn backend of `servers` (name -> host, port),
    each taking at most `max_sessions` connections (more wait in HAProxy's queue, up to 30 s,
    instead of being refused by a full replica)."""
    tunnel = max(int(session_seconds) + 60, 60)
    lines = ["global",
             "    maxconn 4096",
             f"    stats socket {admin_socket} mode 600 level admin",
             "    log stdout format raw local0",
             "",
             "defaults",
             "    mode http",
             "    log global",
             "    option httplog",
             "    option dontlog-normal",
             "    timeout connect 5s",
             "    timeout client 60s",
             "    timeout server 60s",
             f"    timeout tunnel {tunnel}s",
             "    timeout http-request 10s",
             "    timeout queue 30s",
             "    retries 3",
             "    retry-on conn-failure empty-response",
             "    option redispatch 1",
             "",
             "frontend s2s",
             f"    bind {listen_host}:{listen_port}",
             f"    default_backend {BACKEND}",
             "",
             f"backend {BACKEND}",
             "    balance leastconn",
             "    option httpchk GET /healthz",
             "    http-check expect status 200",
             f"    default-server inter {check_interval_ms} fall 2 rise 1 maxconn {max_sessions}",
             *(f"    server {name} {host}:{port} check" for name, (host, port) in servers.items())]
    return "\n".join(lines) + "\n"


class HAProxyAdmin:
    """HAProxy's runtime API over its admin socket (one command per connection)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def command(self, line: str, timeout: float = 5.0) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(self.path))
            conn.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def set_state(self, server: str, state: str) -> None:
        """ready, drain or maint for one server of the backend."""
        reply = self.command(f"set server {BACKEND}/{server} state {state}").strip()
        if reply:
            raise RuntimeError(f"haproxy refused 'set server {BACKEND}/{server} state {state}': {reply}")

    def servers(self) -> dict[str, dict[str, str]]:
        """The backend's servers as `show stat` reports them (status UP/DOWN/DRAIN/MAINT, scur...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows if row.get("pxname") == BACKEND
                and row.get("svname") not in ("FRONTEND", "BACKEND")}
