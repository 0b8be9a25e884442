"""The one-writer rule, held by Prefect: a flow run that writes the project's state (data/,
artifacts/, the registry) holds the single slot of a global concurrency limit while it runs.

Every flow run on the same Prefect server shares that limit, so a second run (another worker,
another machine, a run started from the UI or the CLI) waits for the first instead of rebuilding
files under it, however the workers were started. A subflow runs inside its parent's slot (the
pipeline's data and train subflows) and takes none itself: that would wait for itself. The limit
is created on first use (limit 1); `prefect gcl inspect telugu-s2s-writer` shows who holds it.

A run started from the CLI talks to Prefect's temporary server, which runs none of Prefect's
background services: the repossessor that frees an expired lease on a real server never runs
there, and a run killed together with its temporary server (kill -9, a machine's stop) held the
slot for ever, so every later run waited without end. Leases now live on disk (PREFECT_HOME, the
filesystem lease storage), and a run waiting on a temporary server frees the slots of dead
writers itself (`reclaim_dead_writers`) before each try.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, TypeVar
from uuid import UUID

WRITER_LIMIT = "telugu-s2s-writer"
# The slot is a lease the holder renews (every ~3/4 of it) while it runs. A holder killed with -9
# renews nothing, and the server frees the slot when the lease ends: with Prefect's default of
# 300 s a rerun after a kill waits up to 5 min; 60 s still gives a busy machine 45 s to renew.
WRITER_LEASE_S = 60.0
# Leases kept in files under PREFECT_HOME survive the temporary server that wrote them; the CLI
# sets this as the default (s2s/common.py), and scripts/ui.sh for its server.
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
WAIT_S = 30.0  # a waiting run looks for dead writers, and logs that it waits, this often
F = TypeVar("F", bound=Callable[..., Any])


def ensure_writer_limit(name: str = WRITER_LIMIT) -> None:
    """Create the global concurrency limit `name` with one slot unless the server has it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it at the same moment
                pass


def reclaim_dead_writers(name: str = WRITER_LIMIT, now: datetime | None = None) -> int:
    """Free the slots of writers that died with their temporary server; returns how many.

    Only where this process runs on Prefect's temporary server (no PREFECT_API_URL) with the leases
    on disk: then this machine's leases are all the leases there are. A slot is dead when its lease
    expired (a live holder renews it every ~45 s), or when no lease stands for it a whole lease
    after the limit last changed (a server that kept its leases in memory died with them). The
    slots go back through the server's own decrement, which is atomic against other runs' takes.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings
    from prefect.utilities.asyncutils import run_coro_as_sync

    settings = get_current_settings()
    if settings.api.url or settings.server.concurrency.lease_storage != LEASE_STORAGE:
        return 0
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
        live, dead = run_coro_as_sync(_sweep_leases(limit.id))
        if limit.active_slots <= live:
            return 0
        now = now or datetime.now(timezone.utc)
        quiet = now - limit.updated > timedelta(seconds=WRITER_LEASE_S)
        freed = limit.active_slots - live if quiet else min(dead, limit.active_slots - live)
        if freed > 0:
            client.release_concurrency_slots(names=[name], slots=freed, occupancy_seconds=1.0)
        return freed


async def _sweep_leases(limit_id: UUID) -> tuple[int, int]:
    """(slots under live leases of the limit, slots under its expired leases, which are revoked)."""
    from prefect.server.concurrency.lease_storage.filesystem import (
        ConcurrencyLeaseStorage,
    )

    storage = ConcurrencyLeaseStorage()
    live = dead = 0
    for lease_id in await storage.read_expired_lease_ids(limit=10_000):
        lease = await storage.read_lease(lease_id)
        if lease is not None and limit_id in lease.resource_ids:
            dead += lease.metadata.slots if lease.metadata else 0
        if lease is None or limit_id in lease.resource_ids:
            await storage.revoke_lease(lease_id)
    for lease_id in await storage.read_active_lease_ids(limit=10_000):
        lease = await storage.read_lease(lease_id)
        if lease is not None and limit_id in lease.resource_ids:
            live += lease.metadata.slots if lease.metadata else 0
    return live, dead


def holds_writer_slot(fn: F) -> F:
    """Run the decorated flow body inside the writer slot (under `@flow`, above the function)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefect import get_run_logger
        from prefect.concurrency.sync import concurrency
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        if context is None or context.flow_run is None or context.flow_run.parent_task_run_id is not None:
            return fn(*args, **kwargs)  # called as a plain function, or a subflow inside its parent's slot
        ensure_writer_limit()
        logger = get_run_logger()
        with ExitStack() as slot:
            while True:
                freed = reclaim_dead_writers()
                if freed:
                    logger.warning(f"freed {freed} slot(s) of {WRITER_LIMIT!r} held by a run that died with its server")
                try:
                    # A lease renewal that fails once (a server restart) must not kill an hour of training.
                    slot.enter_context(concurrency(WRITER_LIMIT, occupy=1, strict=True, timeout_seconds=WAIT_S,
                                                   lease_duration=WRITER_LEASE_S,
                                                   raise_on_lease_renewal_failure=False))
                    break
                except TimeoutError:
                    logger.info(f"waiting for {WRITER_LIMIT!r}: another run writes the project's state "
                                f"(`prefect gcl inspect {WRITER_LIMIT}` shows it)")
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
