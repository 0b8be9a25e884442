"""Version the corpus with DVC: `dvc add data` -> data.dvc, `dvc push` to the configured remote.

DVC commands in one workspace must not run concurrently (DVC fails on its own lock rather than
wait), so every call here takes a file lock first and waits its turn. When the repository has no
default remote, a local one is configured in .dvc/config.local (`version.remote_url`), so the
embedded setup needs no account while a team's own remote in .dvc/config takes precedence.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock


class DvcError(RuntimeError):
    """A DVC command failed; the message has the command and DVC's own words."""


@dataclass(frozen=True)
class CorpusVersion:
    corpus_hash: str  # DVC's md5 of the data folder (".dir" object), recorded by later runs
    dvc_file: Path
    remote: str | None
    pushed: bool


def dvc(root: Path, *args: str) -> str:
    """Run one DVC command in `root`, serialized with every other DVC call on this workspace."""
    lock_dir = root / ".dvc" / "tmp"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / "s2s-serial.lock"), timeout=600):
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root}: {' '.join(message[-3:])}")
    return result.stdout


def ensure_repo(root: Path) -> None:
    """A DVC repository in `root` (inside git when there is one, else without SCM)."""
    if (root / ".dvc").is_dir() and (root / ".dvc" / "config").exists():
        return
    in_git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True).returncode == 0
    subprocess.run([sys.executable, "-m", "dvc", "init", *([] if in_git else ["--no-scm"])], cwd=root,
                   check=True, capture_output=True)


def ensure_remote(root: Path, name: str, url: str) -> str:
    """The default remote's name; configures a local one if there is none."""
    try:
        return dvc(root, "remote", "default").strip()
    except DvcError:  # "No default remote set"
        pass
    path = Path(url).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    dvc(root, "remote", "add", "--local", "--force", "--default", name, str(path))
    return name


def corpus_hash(dvc_file: Path) -> str:
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    return outs[0]["md5"]


def version_corpus(root: Path, data_dir: Path, push: bool, remote_name: str, remote_url: str) -> CorpusVersion:
    """`dvc add` the corpus folder (a no-op when unchanged) and push it; return its hash."""
    ensure_repo(root)
    target = data_dir.resolve().relative_to(root.resolve())
    dvc(root, "add", str(target))
    dvc_file = root / f"{target}.dvc"
    remote = None
    if push:
        remote = ensure_remote(root, remote_name, remote_url)
        dvc(root, "push", "-r", remote, str(dvc_file.relative_to(root)))
    return CorpusVersion(corpus_hash(dvc_file), dvc_file, remote, push)


def restore_corpus(root: Path, rev: str, dvc_file: str = "data.dvc") -> str:
    """Bring back the corpus of an earlier git revision (its data.dvc), from cache or remote."""
    subprocess.run(["git", "checkout", rev, "--", dvc_file], cwd=root, check=True, capture_output=True)
    try:
        dvc(root, "checkout", "--force", dvc_file)
    except DvcError:
        dvc(root, "pull", "--force", dvc_file)
    return corpus_hash(root / dvc_file)
