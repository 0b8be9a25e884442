"""The speaker and emotion vocabularies of the checklist.

Their order is part of the model's interface (ids index embedding tables), so it never changes:
new labels are appended.
"""

SPEAKERS: tuple[str, ...] = ("male_young", "male_mature", "female_young", "female_professional")
EMOTIONS: tuple[str, ...] = (
    "neutral",
    "happy",
    "laugh",
    "excited",
    "empathy",
    "surprise",
    "thinking",
    "telugu_heavy_accent",
    "telugu_mild_accent",
)


def speaker_id(name: str) -> int:
    """Index of a checklist speaker; a clear error for any other name."""
    if name not in SPEAKERS:
        raise ValueError(f"unknown speaker {name!r}: expected one of {', '.join(SPEAKERS)}")
    return SPEAKERS.index(name)


def emotion_id(name: str) -> int:
    """Index of a checklist emotion; a clear error for any other name."""
    if name not in EMOTIONS:
        raise ValueError(f"unknown emotion {name!r}: expected one of {', '.join(EMOTIONS)}")
    return EMOTIONS.index(name)
