"""The one-writer rule, held by Prefect: a flow run that writes the project's state (data/,
artifacts/, the registry) holds the single slot of a global concurrency limit while it runs.

Every flow run on the same Prefect server shares that limit, so a second run (another worker,
another machine, a run started from the UI or the CLI) waits for the first instead of rebuilding
files under it, however the workers were started. A subflow runs inside its parent's slot (the
pipeline's data and train subflows) and takes none itself: that would wait for itself. The limit
is created on first use (limit 1); `prefect gcl inspect telugu-s2s-writer` shows who holds it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

WRITER_LIMIT = "telugu-s2s-writer"
# The slot is a lease the holder renews (every ~3/4 of it) while it runs. A holder killed with -9
# renews nothing, and the server frees the slot when the lease ends: with Prefect's default of
# 300 s a rerun after a kill waits up to 5 min; 60 s still gives a busy machine 45 s to renew.
WRITER_LEASE_S = 60.0
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


def holds_writer_slot(fn: F) -> F:
    """Run the decorated flow body inside the writer slot (under `@flow`, above the function)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefect.concurrency.sync import concurrency
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        if context is None or context.flow_run is None or context.flow_run.parent_task_run_id is not None:
            return fn(*args, **kwargs)  # called as a plain function, or a subflow inside its parent's slot
        ensure_writer_limit()
        # A slot whose lease renewal fails once (a server restart) must not kill an hour of training.
        with concurrency(WRITER_LIMIT, occupy=1, strict=True, lease_duration=WRITER_LEASE_S,
                         raise_on_lease_renewal_failure=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
