"""The flows' guard against two runs in one workspace (core.workspace_lock), as a decorator, so a
run started from the CLI, `make pipeline` or a deployment's worker is refused alike."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from core.config import find_root
from core.workspace_lock import workspace_lock

T = TypeVar("T")


def exclusive(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Run the flow body holding the workspace lock of the project root (reentrant: subflows)."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            with workspace_lock(find_root(), what):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
