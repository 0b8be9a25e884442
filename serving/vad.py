"""The server's own end-of-utterance detection: an energy gate with a silence hangover.

Cheap enough to run on every live session (one RMS per 20 ms frame), which a neural VAD is not
at a hundred sessions on two cores; the client may also end utterances itself (protocol `vad`).
"""

from __future__ import annotations

import numpy as np


class EndOfUtterance:
    """Feed audio; `feed` returns True once, when speech was heard and then `silence_ms` of quiet."""

    def __init__(self, sample_rate: int, silence_ms: int = 700, threshold_dbfs: float = -45.0,
                 frame_ms: int = 20) -> None:
        self.frame = int(sample_rate * frame_ms / 1000)
        self.needed = max(1, silence_ms // frame_ms)
        self.threshold = 10 ** (threshold_dbfs / 20)
        self.reset()

    def reset(self) -> None:
        self.buffer = np.zeros(0, dtype=np.float32)
        self.heard_speech = False
        self.quiet_frames = 0

    def feed(self, audio: np.ndarray) -> bool:
        self.buffer = np.concatenate([self.buffer, audio])
        ended = False
        while len(self.buffer) >= self.frame:
            chunk, self.buffer = self.buffer[: self.frame], self.buffer[self.frame:]
            loud = float(np.sqrt(np.mean(chunk * chunk))) > self.threshold
            if loud:
                self.heard_speech, self.quiet_frames = True, 0
            elif self.heard_speech:
                self.quiet_frames += 1
                if self.quiet_frames >= self.needed:
                    ended = True
                    self.reset()
        return ended
