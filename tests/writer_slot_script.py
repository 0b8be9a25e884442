"""Run by tests/test_writer_slot_recovery.py as the CLI runs flows: `s2s`'s Prefect environment
(PREFECT_HOME from the caller, leases on disk) and no PREFECT_API_URL, so this process starts
Prefect's temporary server on that home's database. Prints one JSON line last.

    hold PATH  take the writer slot, touch PATH, sleep until killed
    write      take the writer slot (waiting for it as long as it takes) and report
    orphan     occupy the slot with no lease behind it, then reclaim now and a lease later
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from s2s.common import _prefect_env

_prefect_env()

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

from flows.one_writer import (
    WRITER_LEASE_S,
    WRITER_LIMIT,
    ensure_writer_limit,
    holds_writer_slot,
    reclaim_dead_writers,
)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _active_slots() -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(WRITER_LIMIT).active_slots


def main(mode: str, arg: str | None) -> dict:
    if mode == "hold":
        @flow
        @holds_writer_slot
        def hold() -> None:
            Path(arg).write_text("held")
            time.sleep(3600)

        hold()
        return {}
    if mode == "write":
        lines = _Lines()
        logging.getLogger("prefect").addHandler(lines)

        @flow
        @holds_writer_slot
        def write() -> bool:
            return True

        wrote = write()
        return {"wrote": wrote, "active_slots": _active_slots(), "log": "\n".join(lines.lines)}
    ensure_writer_limit()
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(WRITER_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=1))
    freed_now = reclaim_dead_writers()
    later = datetime.now(timezone.utc) + timedelta(seconds=WRITER_LEASE_S + 1)
    return {"freed_now": freed_now, "freed_later": reclaim_dead_writers(now=later), "active_slots": _active_slots()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)))
