"""The corpus on a team's DVC remote in S3 (docs/scaling.md, "Data"): the remote is named in the
committed .dvc/config, so every clone has it. One clone versions and pushes two corpus versions
(the data flow's own version step); another clone of the git repository pulls, finds `dvc status`
clean locally and against the remote, and restores the older version from the bucket alone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tasks.data.version import dvc, restore_corpus, version_corpus

from .loopback_servers import moto_s3

BUCKET = "team-dvc"


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def _commit(root: Path, message: str) -> str:
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", message)
    return _git(root, "rev-parse", "HEAD")


def test_corpus_versions_travel_between_clones_through_an_s3_remote(project_root: Path, tmp_path: Path):
    with moto_s3(tmp_path, (BUCKET,)) as s3:
        first = project_root  # a git repository with params.yaml (conftest)
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=first, check=True)
        dvc(first, "remote", "add", "--default", "team", f"s3://{BUCKET}/corpus")
        dvc(first, "remote", "modify", "team", "endpointurl", s3.endpoint)
        data = first / "data"
        (data / "segments").mkdir(parents=True)
        (data / "segments" / "a.txt").write_text("version one")
        (data / "manifest.csv").write_text("path\nsegments/a.txt\n")
        # the remote in .dvc/config wins over the embedded local default (version.remote_url)
        v1 = version_corpus(first, data, push=True, remote_name="embedded", remote_url=str(tmp_path / "unused"))
        assert v1.remote == "team" and not (tmp_path / "unused").exists()
        rev1 = _commit(first, "corpus v1")
        (data / "segments" / "a.txt").write_text("version two")
        (data / "segments" / "b.txt").write_text("new in two")
        v2 = version_corpus(first, data, push=True, remote_name="embedded", remote_url=str(tmp_path / "unused"))
        assert v2.corpus_hash != v1.corpus_hash
        _commit(first, "corpus v2")
        assert any(k.endswith(".dir") for k in s3.keys(BUCKET, "corpus/")), "both versions are in the bucket"

        # another machine: a clone of the git repository (what git carries: data.dvc, .dvc/config)
        second = tmp_path / "second"
        subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True)
        assert not (second / "data").exists()
        dvc(second, "pull")
        assert (second / "data" / "segments" / "a.txt").read_text() == "version two"
        assert (second / "data" / "segments" / "b.txt").read_text() == "new in two"
        assert "up to date" in dvc(second, "status")
        assert "are in sync" in dvc(second, "status", "--cloud")

        # the older corpus, from the bucket alone (this clone never had it in its cache)
        assert restore_corpus(second, rev1) == v1.corpus_hash
        assert (second / "data" / "segments" / "a.txt").read_text() == "version one"
        assert not (second / "data" / "segments" / "b.txt").exists()
        assert "up to date" in dvc(second, "status")
