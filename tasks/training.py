"""What both training tasks share: device and precision, DDP, exact resume, MLflow tracking.

Exact resume: a checkpoint holds the model, the optimizer, the step and every RNG state, and the
data for step N is drawn from a generator seeded with (seed, N) rather than from an iterator's
position, so a run resumed from step k replays steps k+1.. exactly as an uninterrupted run would.
Checkpoints are written atomically (temporary file, then rename), so a kill mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml

from tasks import atomic


def select_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else the CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} asked for, but CUDA is not available here")
    return torch.device(preference)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on the CPU (bf16 matmuls are slow there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The RNG for one step's data: a function of (seed, step, rank) only, so resume is exact."""
    return torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFF_FFFF_FFFF_FFFF)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **payload: Any) -> Path:
    """Atomically write a checkpoint (model/optimizer states, step, config, RNG states)."""
    with atomic.atomic_path(path, suffix=".pt") as tmp:
        torch.save({**payload, "rng": rng_state()}, tmp)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def planned_steps(items: int, batch_size: int, world_size: int, epochs: int, max_steps: int | None) -> int:
    """Steps for `epochs` passes over `items` at this global batch, capped by max_steps if set."""
    total = epochs * math.ceil(items / (batch_size * world_size))
    return min(total, max_steps) if max_steps is not None else total


def cost_metrics(seconds: float, device: torch.device, cost: Any, world_size: int) -> dict[str, float]:
    """Wall hours and estimated cost: device hours x the hourly rate params.yaml gives."""
    hours = seconds / 3600
    rate = cost.gpu_hour_usd if device.type == "cuda" else cost.cpu_hour_usd
    return {"wall_hours": hours, "cost_usd": hours * rate * world_size}


def run_tags(params: Any, stage: str) -> dict[str, str]:
    """What every training run records: its stage, corpus version, code version and profile."""
    return {"stage": stage, "corpus_hash": corpus_hash(params.root, params.path(params.paths.data)),
            "git_commit": git_commit(params.root), "profile": params.profile}


def git_commit(root: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    commit = result.stdout.strip() if result.returncode == 0 else "unknown"
    return f"{commit}-dirty" if dirty and commit != "unknown" else commit


def corpus_hash(root: Path, data_dir: Path) -> str:
    """The DVC hash of the corpus a run trains on (data.dvc), or 'unversioned'."""
    dvc_file = root / f"{data_dir.name}.dvc"
    if dvc_file.is_file():
        return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    return "unversioned"


def tracking_uri(root: Path, configured: str | None) -> str:
    """MLFLOW_TRACKING_URI, else params' mlflow.tracking_uri, else the embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"


def use_experiment(root: Path, uri: str | None, experiment: str) -> str:
    """Point MLflow at the store and the experiment (created with artifacts under mlflow/)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(root, uri))
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        artifacts = root / "mlflow" / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        experiment_id = mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri())
    else:
        experiment_id = found.experiment_id
    mlflow.set_experiment(experiment)
    return experiment_id


def corpus_fingerprint(params: Any) -> dict[str, str]:
    """What a training stage's inputs are, for its stamp: the DVC hash and the manifest's and
    pairs' content (the DVC hash alone is 'unversioned' when versioning is off)."""
    from tasks.stamps import file_sha256

    data = params.path(params.paths.data)
    return {"corpus_hash": corpus_hash(params.root, data),
            **{name: file_sha256(data / name) if (data / name).is_file() else "missing"
               for name in ("manifest.csv", "pairs.jsonl")}}


def cached_result(out_dir: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """The stored result of a finished stage whose stamp equals `stamp`, else None.

    This is what lets a re-run of the train flow (or the CLI, or dvc repro) skip a stage whose
    corpus, settings and code are unchanged: result.json is written last, beside a stamp.json
    of exactly those inputs, and the checkpoint it names must still exist.
    """
    stamp_path, result_path = out_dir / "stamp.json", out_dir / "result.json"
    if not (stamp_path.is_file() and result_path.is_file()):
        return None
    if json.loads(stamp_path.read_text()) != json.loads(json.dumps(stamp, default=str)):
        return None
    result = json.loads(result_path.read_text())
    return result if Path(result["checkpoint"]).is_file() and result.get("metrics") else None


def write_stamp(out_dir: Path, stamp: dict[str, Any]) -> None:
    atomic.write_text(out_dir / "stamp.json", json.dumps(stamp, indent=2, sort_keys=True, default=str) + "\n")


class RunTracker:
    """An MLflow run on the main rank (nothing on the others), plus a local metrics.jsonl.

    The JSONL beside the checkpoints is what resume tests and dashboards without MLflow read; it
    is appended per logged step and truncated to the resumed step on resume.
    """

    def __init__(self, main: bool, use_mlflow: bool, root: Path, uri: str | None, experiment: str, run_name: str,
                 metrics_path: Path, resume_step: int, system_metrics: bool, run_id: str | None = None,
                 parent_run_id: str | None = None) -> None:
        self.main = main
        self.enabled = main and use_mlflow  # MLflow on the main rank only
        self.metrics_path = metrics_path
        self.run_id: str | None = None
        if not main:
            return
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and metrics_path.is_file():
            kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= resume_step]
        atomic.write_text(metrics_path, "".join(l + "\n" for l in kept))
        if not self.enabled:
            return
        import mlflow

        self.mlflow = mlflow
        use_experiment(root, uri, experiment)
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id and not run_id else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=tags,
                               log_system_metrics=system_metrics, nested=mlflow.active_run() is not None)
        self.run_id = run.info.run_id

    @classmethod
    def for_training(cls, params: Any, stage: str, out_dir: Path, is_main: bool, use_mlflow: bool,
                     resume_step: int, run_id: str | None, parent_run_id: str | None = None) -> "RunTracker":
        """The tracker of a training stage: its run (continued on resume, nested under the flow's
        run when there is one) and its metrics.jsonl."""
        return cls(is_main, use_mlflow, params.root, params.mlflow.tracking_uri, params.mlflow.experiment, stage,
                   out_dir / "metrics.jsonl", resume_step, params.mlflow.system_metrics, run_id, parent_run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self.mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.main:
            return
        if self.enabled:
            self.mlflow.log_metrics(metrics, step=step)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled:
            self.mlflow.log_artifact(str(path), artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.mlflow.end_run(status=status)


@contextlib.contextmanager
def tracked(tracker: RunTracker) -> Iterator[RunTracker]:
    """End the MLflow run as FAILED (or KILLED on Ctrl-C) when training raises."""
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
