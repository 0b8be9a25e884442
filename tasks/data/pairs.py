"""Conversational pairs: a turn and the reply that follows it, for S2S training.

Rule: within one recording, two consecutive kept segments form a pair when their speakers
differ and the second starts within `max_gap_s` of the first's end (a reply follows quickly; a
long pause starts a new exchange). Speaker ids are the checklist speakers' indices (from the
source's metadata, else the pitch rule in tasks/data/speakers.py); the emotion id is the source's
emotion, else `pairs.default_emotion`.
"""

from __future__ import annotations

import pandas as pd

from core.labels import emotion_id, speaker_id


def make_pairs(kept: pd.DataFrame, max_gap_s: float, default_emotion: str) -> list[dict]:
    emotion_id(default_emotion)  # a clear error for a misspelt default
    pairs: list[dict] = []
    for _, rows in kept.sort_values(["recording_id", "start"]).groupby("recording_id", sort=True):
        records = rows.to_dict("records")
        for first, second in zip(records, records[1:]):
            gap = second["start"] - first["end"]
            if first["speaker"] == second["speaker"] or gap > max_gap_s or gap < 0:
                continue
            emotion = second.get("emotion") or default_emotion
            pairs.append({
                "pair_id": f"{first['segment_id']}>{second['segment_id'].rsplit('--', 1)[-1]}",
                "recording_id": first["recording_id"],
                "source_id": first["source_id"],
                "split": first["split"],
                "input_segment": first["segment_id"],
                "reply_segment": second["segment_id"],
                "input_speaker": first["speaker"],
                "input_speaker_id": speaker_id(first["speaker"]),
                "reply_speaker": second["speaker"],
                "reply_speaker_id": speaker_id(second["speaker"]),
                "reply_emotion": emotion,
                "reply_emotion_id": emotion_id(emotion),
                "gap_s": round(gap, 3),
            })
    return pairs
