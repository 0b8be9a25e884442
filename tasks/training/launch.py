"""Training a stage on several processes or machines through torchrun, as the train flow does.

params.yaml `distributed` sets nodes x processes. 1 x 1 (the default) trains in the flow's own
process, as it always has. Anything more runs `torchrun` with the stage's CLI command
(`s2s train codec|s2s`): one node with a standalone rendezvous, several nodes with a c10d
rendezvous at `rdzv_endpoint` (gloo on the CPU, NCCL on CUDA: tasks/training/device.py). The
flow's node is one of them; every other node runs `s2s train node` with the same profile and
overrides, which makes the same launches in the same order (codec, then S2S).

The ranks get the flow's resolved parameters (overrides included) as --set flags, so what they
train is what the flow asked for; each stage checks that every rank computed the same stamp
(corpus, settings, code) and sees the same output folder (tasks/training/shards.py). Rank 0
writes the checkpoint and result.json there; this launcher reads the result back from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import yaml

from core.config import Params

Stage = Literal["codec", "s2s"]
STAGES: tuple[Stage, ...] = ("codec", "s2s")


class LaunchError(RuntimeError):
    pass


def is_distributed(params: Params) -> bool:
    return params.distributed.world_size > 1


def param_flags(params: Params) -> list[str]:
    """Every resolved parameter as a --set flag (JSON values, which the CLI reads as YAML)."""
    flags: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node and all(isinstance(k, str) and k.isidentifier() for k in node):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, dict) and node:  # keyed by data (sessions -> latency): one YAML value
            plain = json.loads(json.dumps({k: v for k, v in node.items()}, default=str))
            restored = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v for k, v in plain.items()}
            flags.append(f"--set={prefix[:-1]}={yaml.safe_dump(restored, default_flow_style=True, width=10**9).strip()}")
        else:
            flags.append(f"--set={prefix[:-1]}={json.dumps(node, separators=(',', ':'), default=str)}")

    walk(params.model_dump(mode="python", exclude={"profile", "root"}), "")
    return flags


def torchrun_command(params: Params, stage: Stage, extra: list[str] = ()) -> list[str]:
    """The torchrun command line of one stage on this node (the same on every node)."""
    if stage not in STAGES:
        raise LaunchError(f"unknown training stage {stage!r}: {' or '.join(STAGES)}")
    d = params.distributed
    torchrun = Path(sys.executable).with_name("torchrun")
    if d.nnodes == 1:
        where = ["--standalone", "--nnodes=1"]
    else:
        where = [f"--nnodes={d.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={d.rdzv_endpoint}",
                 f"--rdzv-id={d.rdzv_id}-{stage}", f"--rdzv-conf=join_timeout={d.join_timeout_s}"]
    return [str(torchrun), *where, f"--nproc-per-node={d.nproc_per_node}", "-m", "s2s.cli", "train", stage,
            "--profile", params.profile, *param_flags(params), *extra]


def stage_out_dir(params: Params, stage: Stage) -> Path:
    return params.path(params.codec_train.out_dir if stage == "codec" else params.s2s_train.out_dir)


def run_stage(params: Params, stage: Stage, *, resume: bool | Literal["auto"] = False, force: bool = False,
              track: bool = True, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run one stage under torchrun on this node and return its result.json (as the stage's
    result dataclass takes it; `cached` when the ranks reused a finished run). resume as in
    tasks/training/resume.py: True continues last.pt, "auto" when it was made with these settings."""
    resume_flag = {True: ["--resume"], "auto": ["--auto-resume"]}.get(resume, [])
    extra = [*resume_flag, *(["--force"] if force else []),
             *([] if track else ["--no-mlflow"]), *(["--parent-run-id", parent_run_id] if parent_run_id else [])]
    result_path = stage_out_dir(params, stage) / "result.json"
    before = result_path.stat().st_mtime_ns if result_path.is_file() else None
    env = {**os.environ, "S2S_ROOT": str(params.root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(torchrun_command(params, stage, extra), env=env, cwd=params.root)
    if done.returncode != 0:
        raise LaunchError(f"torchrun ({params.distributed.nnodes} node(s) x {params.distributed.nproc_per_node} "
                          f"process(es)) training {stage} exited with code {done.returncode}; its ranks' errors "
                          "are above")
    if not result_path.is_file():
        raise LaunchError(f"torchrun training {stage} finished but wrote no {result_path}: is this node's "
                          f"{stage_out_dir(params, stage)} the shared folder rank 0 wrote to?")
    result = json.loads(result_path.read_text())
    return {**result, "cached": result_path.stat().st_mtime_ns == before}


def run_node(params: Params, stages: list[Stage], track: bool = True) -> None:
    """Another node's share of the train flow: the same torchrun launches, in the same order."""
    for stage in stages:
        run_stage(params, stage, resume="auto", track=track)  # as the flow's node launches them
