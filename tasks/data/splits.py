"""Train/val/test splits by source: deterministic, and no source in two splits.

Splitting by source (not by segment) keeps one recording's speakers, room and noise out of the
evaluation splits of a model trained on it. Sources are ordered by a seeded hash of their id, so
adding a source moves no other source between splits.
"""

from __future__ import annotations

import hashlib


def split_sources(source_ids: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"split fractions must be in [0, 1) and sum below 1, got val={val_fraction}, test={test_fraction}")
    ids = sorted(set(source_ids), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n = len(ids)
    n_test = max(1, round(n * test_fraction)) if n >= 3 and test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if n >= 3 and val_fraction > 0 else 0
    return {
        "test": sorted(ids[:n_test]),
        "val": sorted(ids[n_test: n_test + n_val]),
        "train": sorted(ids[n_test + n_val:]),
    }
