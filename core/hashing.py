"""Fingerprints for the per-step stamps that make re-runs skip unchanged work.

A stamp must change when the step's inputs, its settings *or its code* change; hashing the
source of the modules a step runs is what Prefect's TASK_SOURCE cache policy does, kept here so
the CLI and `dvc repro` get the same behaviour as the flows.
"""

from __future__ import annotations

import hashlib
import inspect
from functools import lru_cache
from pathlib import Path
from types import ModuleType


@lru_cache(maxsize=None)
def _module_hash(module: ModuleType) -> str:
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()


def code_hash(*modules: ModuleType) -> str:
    """One hash over the source code of `modules`."""
    return hashlib.sha256("".join(_module_hash(m) for m in modules).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
