"""Where the MLflow store is: the one rule every layer uses (training, registry, server)."""

from __future__ import annotations

import os
from pathlib import Path


def tracking_uri(root: Path, configured: str | None) -> str:
    """MLFLOW_TRACKING_URI, else params' mlflow.tracking_uri, else the embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
