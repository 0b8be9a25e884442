"""Where a training run starts: at step 0, or at its last checkpoint.

Every training checkpoint records the stamp of the run that wrote it: the corpus, settings and
code that stage_cache.py keeps in stamp.json once a run finishes. A run asked to resume "auto"
(what the flows ask) continues last.pt only when that stamp equals its own, so a pipeline run
started again after a kill -9 mid-training loses at most `checkpoint_every` steps instead of the
whole training, and ends with the weights an uninterrupted run has (the checkpoint holds the
optimizer and every RNG state). A checkpoint of other settings, one written before checkpoints
kept their stamp, or one that cannot be read is not continued: the run starts at step 0 and says
why. An explicit `--resume` (resume=True) continues whatever checkpoint is there, as it always
did: that is how a finished run is trained further with a larger max_steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Union

import torch.distributed as dist

from core.checkpoints import load_checkpoint
from tasks.training.device import DistInfo

Resume = Union[bool, Literal["auto"]]


def stamp_text(stamp: dict[str, Any]) -> str:
    """The stamp as the checkpoint stores it (the JSON that stamp.json holds, sorted)."""
    return json.dumps(stamp, sort_keys=True, default=str)


def stamp_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ (two levels deep: `train.lr`, `code`)."""
    differing = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            differing += stamp_differences(a, b, f"{key}.")
        else:
            differing.append(prefix + key)
    return differing


def _matching_checkpoint(checkpoint: Path, stamp: dict[str, Any], stage: str) -> dict[str, Any] | None:
    """The checkpoint's state when it was written by a run with this stamp, else None (said why)."""
    if not checkpoint.is_file():
        return None
    try:
        state = load_checkpoint(checkpoint)
    except Exception as exc:  # noqa: BLE001 - a checkpoint that does not load is started over, not fatal
        why = f"it cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
    else:
        if "stamp" not in state:
            why = "it records no settings stamp (written before checkpoints kept one)"
        else:
            current = json.loads(stamp_text(stamp))
            differing = stamp_differences(json.loads(state["stamp"]), current)
            if not differing:
                return state
            why = f"it was made with other settings (differs in: {', '.join(differing)})"
    print(f"{stage} training starts over at step 0: {checkpoint} is not continued, {why}", flush=True)
    return None


def _choose(checkpoint: Path, stamp: dict[str, Any], resume: Resume, stage: str) -> dict[str, Any] | None:
    if resume is True:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume asked for, but there is no checkpoint at {checkpoint}")
        return load_checkpoint(checkpoint)
    return _matching_checkpoint(checkpoint, stamp, stage) if resume == "auto" else None


def resume_state(checkpoint: Path, stamp: dict[str, Any], resume: Resume, stage: str,
                 info: DistInfo) -> dict[str, Any] | None:
    """The checkpoint state a run continues from, or None to start at step 0.

    resume=True: last.pt whatever its stamp (FileNotFoundError when there is none); False: None;
    "auto": last.pt when its stamp equals `stamp`. Under DDP rank 0 chooses and every rank follows
    (its error too), so ranks launched with other resume flags still agree and never wait on each
    other.
    """
    if info.world_size == 1:
        return _choose(checkpoint, stamp, resume, stage)
    state, chosen = None, [False]
    if info.is_main:
        try:
            state = _choose(checkpoint, stamp, resume, stage)
            chosen = [state is not None]
        except FileNotFoundError as exc:
            chosen = [str(exc)]
    dist.broadcast_object_list(chosen, src=0)
    if isinstance(chosen[0], str):
        raise FileNotFoundError(chosen[0])
    if info.is_main or not chosen[0]:
        return state
    return load_checkpoint(checkpoint)
