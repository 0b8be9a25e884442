"""Training on two nodes: a c10d rendezvous (gloo) on loopback between two torchrun launches with
--nnodes 2, one made by the train flow's launcher (tasks/training/launch.py run_stage) and one by
`s2s train node` (another machine's side), trains the tiny codec. Two nodes at batch 2 match one
process at batch 4 (the same global batch, tasks/training/shards.py): weights within 1e-4 and the
test-split metrics within 1e-3 relative, the float-summation-order tolerance. A node whose
output folder is not rank 0's is refused before training.

Real torchrun processes on loopback; about a minute of CPU here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.config import load_params
from tasks.benchmarks.server_launcher import free_port
from tasks.training import launch

from .conftest import TINY, cli_sets

STEPS = 8


def _settings(out_dir: Path, batch_size: int, nnodes: int = 1) -> dict:
    return {**TINY, "codec_train": {**TINY["codec_train"], "batch_size": batch_size, "max_steps": STEPS,
                                    "out_dir": str(out_dir)},
            "distributed": {"nnodes": nnodes, "nproc_per_node": 1, "rdzv_endpoint": f"127.0.0.1:{free_port()}",
                            "rdzv_id": "test", "join_timeout_s": 120}}


def _node(settings: dict) -> subprocess.Popen:
    """The other machine's side: `s2s train node` with the same settings."""
    return subprocess.Popen([sys.executable, "-m", "s2s.cli", "train", "node", "--stage", "codec", "--no-mlflow",
                             *cli_sets(settings)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_nodes_train_the_codec_as_one_process_does(tiny_corpus: Path, project_root: Path):
    one = _settings(project_root / "one-process", batch_size=4)
    subprocess.run([sys.executable, "-m", "s2s.cli", "train", "codec", "--no-mlflow", *cli_sets(one)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)

    two = _settings(project_root / "two-nodes", batch_size=2, nnodes=2)
    other = _node(two)
    try:
        result = launch.run_stage(load_params("smoke", two), "codec", track=False)
        out, _ = other.communicate(timeout=300)
    finally:
        if other.poll() is None:
            other.kill()
    assert other.returncode == 0, out[-3000:]
    assert result["steps"] == STEPS and not result["cached"]
    assert Path(result["checkpoint"]) == project_root / "two-nodes" / "last.pt"

    reference = json.loads((project_root / "one-process" / "result.json").read_text())
    for name in ("mel_distance", "stoi", "snr_db"):
        assert result["metrics"][name] == pytest.approx(reference["metrics"][name], rel=1e-3, abs=1e-4), name
    a = torch.load(project_root / "one-process" / "last.pt", weights_only=False)["model"]
    b = torch.load(project_root / "two-nodes" / "last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-4, f"weights differ by up to {worst:.2e}"
    rows = [json.loads(line) for line in (project_root / "two-nodes" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["step_seconds"] > 0 for row in rows if "loss" in row)


def test_a_node_that_cannot_see_rank_0s_folder_is_refused(tiny_corpus: Path, project_root: Path):
    settings = _settings(project_root / "shared", batch_size=2, nnodes=2)
    elsewhere = {**settings, "codec_train": {**settings["codec_train"], "out_dir": str(project_root / "local")}}
    other = _node(elsewhere)  # its out_dir is not rank 0's: as if the folder were on its own disk
    try:
        with pytest.raises(launch.LaunchError, match="exited with code"):
            launch.run_stage(load_params("smoke", settings), "codec", track=False)
        out, _ = other.communicate(timeout=300)
    finally:
        if other.poll() is None:
            other.kill()
    assert other.returncode != 0
    assert "is not shared by every node" in out  # every rank says why, whichever is rank 0
