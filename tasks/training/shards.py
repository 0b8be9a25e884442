"""What several training processes share and split: each step's global batch, and the folder
the checkpoints go to.

Every rank draws the whole global batch (batch_size x world_size rows) from the step's generator
and keeps its own slice, so N processes of batch B see exactly the rows one process of batch N x B
sees, and DDP's mean of their gradients is that process's gradient: a multi-node run matches the
single-process one up to float summation order (tests/test_distributed_training.py). One process
draws B rows from the same generator as before, so a 1-process run is unchanged.

Checkpoints and results are written by global rank 0 alone, which can be any node of a c10d
rendezvous; resume and the flow that exports the bundle read them from every node. So before
training, rank 0 writes a token into the output folder and every rank must read it back:
a folder that is not on storage every node mounts fails at once, with the hosts that cannot see
it, instead of after hours of training.
"""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.training.device import DistInfo


def rank_slice(rows: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's equal share of a global batch (its first dimension)."""
    if info.world_size == 1:
        return rows
    share = len(rows) // info.world_size
    return rows[info.rank * share: (info.rank + 1) * share]


class SharedFolderError(RuntimeError):
    """The ranks do not share what they must: the output folder, or the inputs of the stage."""


def check_shared_folder(folder: Path, info: DistInfo) -> None:
    """Raise SharedFolderError on every rank unless all ranks see what rank 0 writes in `folder`."""
    if info.world_size == 1:
        return
    token = [uuid.uuid4().hex if info.is_main else None]
    dist.broadcast_object_list(token, src=0)
    marker = folder / f".shared-check-{token[0]}"
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(socket.gethostname())
    dist.barrier()
    seen: list = [None] * info.world_size
    dist.all_gather_object(seen, (socket.gethostname(), info.rank, marker.is_file()))
    dist.barrier()
    if info.is_main:
        marker.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for host, rank, ok in seen if not ok]
    if blind:
        raise SharedFolderError(f"{folder} is not shared by every node: {', '.join(blind)} cannot see what rank 0 "
                                f"wrote there; put paths.artifacts (or the stage's out_dir) on storage every node "
                                "mounts (docs/scaling.md, Training)")


def check_same_stamp(stamp: dict, info: DistInfo) -> None:
    """Raise on every rank unless all ranks computed rank 0's stamp: the same corpus, settings and
    code on every node (else DDP would average gradients of different trainings)."""
    if info.world_size == 1:
        return
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()
    seen: list = [None] * info.world_size
    dist.all_gather_object(seen, (socket.gethostname(), info.rank, digest))
    other = [f"rank {rank} on {host}" for host, rank, d in seen if d != seen[0][2]]
    if other:
        raise SharedFolderError(f"{', '.join(other)} would train other inputs than rank 0 (corpus, settings or code "
                                "differ): run every node on the same revision, corpus version, profile and --set "
                                "overrides")
