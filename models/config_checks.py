"""Reading a model config from a checkpoint's dict, strictly: what both codec kinds need.

A misspelt or unknown field is refused by name instead of ignored, and a checkpoint made with
another architecture is refused naming every differing field, instead of failing as a wall of
tensor-size errors or, worse, loading (a different hop with the same shapes) and decoding noise.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], values: dict[str, Any], what: str) -> T:
    """`cls(**values)`; missing keys take their defaults, unknown keys raise ValueError."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} config fields: {', '.join(unknown)}")
    return cls(**values)


def check_same_architecture(ours: Any, theirs: Any, ignored: frozenset[str] = frozenset()) -> None:
    """ValueError naming every field (but the `ignored` ones) where a checkpoint's config differs."""
    diffs = [f"{f.name} (checkpoint {getattr(theirs, f.name)!r}, model {getattr(ours, f.name)!r})"
             for f in fields(ours) if f.name not in ignored and getattr(theirs, f.name) != getattr(ours, f.name)]
    if diffs:
        raise ValueError("checkpoint was made with another codec config; differing fields: " + ", ".join(diffs))
