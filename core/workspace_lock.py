"""One flow run at a time per workspace: a second `make pipeline` in the same folder is refused.

Two runs in one project root would write the same data/, artifacts/, data.dvc and MLflow store at
once (DVC fails on its own lock mid-run; the corpus swap and the stage caches are not meant to be
shared). The lock is an flock on `.s2s/workspace.lock`: the kernel drops it when its holder dies,
even by SIGKILL, so a crashed run never blocks the next. The file records who holds it, so the
refusal says which run to wait for. Reentrant within a process: the pipeline flow holds it and
runs the data and train flows as subflows.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_FILE = Path(".s2s") / "workspace.lock"
_held: dict[Path, tuple[int, int]] = {}  # root -> (fd, depth) held by this process
_guard = threading.Lock()


class WorkspaceBusy(RuntimeError):
    """Another run holds the workspace; the message names it."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    since = time.strftime("%H:%M:%S UTC", time.gmtime(info.get("since", 0)))
    return f"pid {info.get('pid', '?')} ({info.get('what', '?')}: {info.get('command', '?')}), since {since}"


@contextmanager
def workspace_lock(root: Path, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the workspace of `root` for `what` (e.g. "pipeline flow"); WorkspaceBusy when another
    process holds it after `wait_s` seconds."""
    root = Path(root).resolve()
    with _guard:
        if root in _held:
            fd, depth = _held[root]
            _held[root] = (fd, depth + 1)
            acquired = False
        else:
            acquired = True
    if acquired:
        path = root / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise WorkspaceBusy(f"the workspace {root} is in use by {_holder(path)}: one flow run at a "
                                        f"time per project folder; wait for it to finish (or stop it), then "
                                        f"run again") from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "what": what, "since": time.time(),
                                  "command": " ".join(os.path.basename(a) for a in sys.argv[:3])}).encode(), 0)
        with _guard:
            _held[root] = (fd, 1)
    try:
        yield
    finally:
        with _guard:
            fd, depth = _held[root]
            if depth > 1:
                _held[root] = (fd, depth - 1)
            else:
                del _held[root]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
