"""What a training run was made from: the code version (git), the corpus version (DVC) and the
fingerprint of the corpus files a stage's stamp compares."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from core.hashing import file_sha256


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


def corpus_fingerprint(params: Any) -> dict[str, str]:
    """What a training stage's inputs are, for its stamp: the DVC hash and the manifest's and
    pairs' content (the DVC hash alone is 'unversioned' when versioning is off)."""
    data = params.path(params.paths.data)
    return {"corpus_hash": corpus_hash(params.root, data),
            **{name: file_sha256(data / name) if (data / name).is_file() else "missing"
               for name in ("manifest.csv", "pairs.jsonl")}}
