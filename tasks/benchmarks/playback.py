"""What a listener hears of a streamed reply, and how long callers think between turns.

`playback_gap_s`: a real-time player starts playing at the first frame's arrival (plus an
optional jitter buffer) and plays each frame's samples in turn; when the next frame has not
arrived by the time the audio so far has played out, it has nothing to play (an underrun) until
that frame arrives. The sum of those waits is the reply's playback gap: a reply that arrives
slower than real time stutters, and the listener hears it like an error.

`ThinkTime`: the conversational load profile's pause between hearing a reply and speaking
again, drawn from a stated, seeded distribution (log-normal), beside the back-to-back profile
(no pause), so both the worst case and the usual case are on record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def playback_gap_s(arrivals: Sequence[tuple[float, int]], sample_rate: int, buffer_s: float = 0.0) -> float:
    """Seconds a real-time player starves while playing a reply whose frames (arrival time in
    seconds, samples) arrive as given; playback starts `buffer_s` after the first arrival."""
    if buffer_s < 0:
        raise ValueError(f"buffer_s {buffer_s} must be >= 0")
    gap, runs_out = 0.0, None  # runs_out: when the audio received so far has been played
    for at, samples in arrivals:
        if runs_out is None:
            runs_out = at + buffer_s
        elif at > runs_out:
            gap += at - runs_out
            runs_out = at
        runs_out += samples / sample_rate
    return gap


@dataclass(frozen=True)
class ThinkTime:
    """Log-normal pause (seconds) before a caller speaks again: `median_s` and `sigma` (of the
    log); draws are capped at `max_s`. Each client draws from its own generator seeded with
    seed + client, so a run is repeatable whatever the order the clients run in."""

    median_s: float = 1.5
    sigma: float = 0.6
    max_s: float = 8.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.median_s <= 0 or self.sigma < 0 or self.max_s < 0:
            raise ValueError(f"think time: median_s > 0, sigma >= 0 and max_s >= 0, got {self}")

    def generator(self, client: int) -> np.random.Generator:
        return np.random.default_rng(self.seed + client)

    def draw(self, rng: np.random.Generator) -> float:
        return float(min(rng.lognormal(np.log(self.median_s), self.sigma), self.max_s))

    def describe(self) -> str:
        return (f"log-normal think time between turns, median {self.median_s:g} s, sigma {self.sigma:g} "
                f"(of the log), capped at {self.max_s:g} s, seed {self.seed}")
