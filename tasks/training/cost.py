"""How long a training stage runs and what it costs: planned steps, wall hours and the estimated
price at the hourly rates params.yaml gives."""

from __future__ import annotations

import math
from typing import Any

import torch


def planned_steps(items: int, batch_size: int, world_size: int, epochs: int, max_steps: int | None) -> int:
    """Steps for `epochs` passes over `items` at this global batch, capped by max_steps if set."""
    total = epochs * math.ceil(items / (batch_size * world_size))
    return min(total, max_steps) if max_steps is not None else total


def cost_metrics(seconds: float, device: torch.device, cost: Any, world_size: int) -> dict[str, float]:
    """Wall hours and estimated cost: device hours x the hourly rate params.yaml gives."""
    hours = seconds / 3600
    rate = cost.gpu_hour_usd if device.type == "cuda" else cost.cpu_hour_usd
    return {"wall_hours": hours, "cost_usd": hours * rate * world_size}
