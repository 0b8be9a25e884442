"""A run killed with its temporary Prefect server does not hold the writer slot for ever
(flows/one_writer.py, `reclaim_dead_writers`).

Both tests run flows the way the CLI does (tests/writer_slot_script.py: `s2s`'s Prefect
environment, no PREFECT_API_URL, so each process starts Prefect's temporary server on the
project's database), in a throwaway PREFECT_HOME:
- a writer killed with -9 together with its server (its process group) while it holds the slot:
  the next run takes the slot once the dead writer's lease has run out (~1-2 min), where it used
  to wait without end;
- a slot taken under a lease that no storage knows any more (a server that kept its leases in
  memory died with them): freed only once the limit has been quiet for a whole lease.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import REPO
from .loopback_servers import Process, prefect_env

SCRIPT = Path(__file__).with_name("writer_slot_script.py")


def _run(args: list[str], home: Path, timeout_s: float) -> dict:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=prefect_env(home),
                            capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{args}: rc {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_run_killed_with_its_server_frees_the_writer_slot(tmp_path: Path):
    home = tmp_path / "prefect-home"
    held = tmp_path / "held"
    writer = Process([sys.executable, str(SCRIPT), "hold", str(held)], tmp_path / "writer.log",
                     env=prefect_env(home), cwd=REPO)
    try:
        writer.wait_until(held.exists, "the first writer", timeout_s=240)
        os.killpg(writer.popen.pid, signal.SIGKILL)  # the writer and its temporary server, as a stop does
        writer.popen.wait(10)
    finally:
        writer.stop()
    assert list((home / "concurrency_leases").glob("*.json")), "the dead writer's lease was kept on disk"
    started = time.monotonic()
    after = _run(["write"], home, timeout_s=400)
    assert after["wrote"], "the next run ran its body"
    assert after["active_slots"] == 0, f"the next run released the slot it took: {after}"
    assert "freed 1 slot(s)" in after["log"], f"the next run said it freed the dead writer's slot: {after['log']}"
    assert time.monotonic() - started < 300


def test_a_slot_without_any_lease_is_freed_only_after_a_quiet_lease(tmp_path: Path):
    result = _run(["orphan"], tmp_path / "prefect-home", timeout_s=300)
    assert result["freed_now"] == 0, "a slot taken a moment ago may still be getting its lease"
    assert result["freed_later"] == 1, "a whole lease later, nothing stands for it: freed"
    assert result["active_slots"] == 0
