"""DVC versioning: add and push the corpus, then restore an older version from git + DVC."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from tasks.data.version import restore_corpus, version_corpus


def _commit(root: Path, message: str) -> str:
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=root, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_push_and_restore_an_older_corpus(project_root: Path, tmp_path: Path):
    data = project_root / "data"
    remote = tmp_path / "remote"
    (data / "segments").mkdir(parents=True)
    (data / "segments" / "a.txt").write_text("version one")
    v1 = version_corpus(project_root, data, push=True, remote_name="embedded", remote_url=str(remote))
    assert v1.corpus_hash.endswith(".dir") and v1.pushed and any(remote.rglob("*"))
    rev1 = _commit(project_root, "corpus v1")

    (data / "segments" / "a.txt").write_text("version two")
    (data / "segments" / "b.txt").write_text("new file")
    v2 = version_corpus(project_root, data, push=True, remote_name="embedded", remote_url=str(remote))
    assert v2.corpus_hash != v1.corpus_hash
    _commit(project_root, "corpus v2")
    again = version_corpus(project_root, data, push=False, remote_name="embedded", remote_url=str(remote))
    assert again.corpus_hash == v2.corpus_hash, "an unchanged corpus keeps its hash"

    # restore from the remote alone: drop the local cache first
    subprocess.run(["rm", "-rf", str(project_root / ".dvc" / "cache")], check=True)
    assert restore_corpus(project_root, rev1) == v1.corpus_hash
    assert (data / "segments" / "a.txt").read_text() == "version one"
    assert not (data / "segments" / "b.txt").exists()


def test_concurrent_dvc_calls_wait_for_each_other(project_root: Path, tmp_path: Path):
    """Two flows versioning at once: the file lock serializes them instead of DVC failing."""
    errors: list[BaseException] = []
    for name in ("one", "two"):
        (project_root / name).mkdir()
        (project_root / name / "f.txt").write_text(name)
    version_corpus(project_root, project_root / "one", False, "embedded", str(tmp_path / "r"))

    def add(name: str) -> None:
        try:
            version_corpus(project_root, project_root / name, False, "embedded", str(tmp_path / "r"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (project_root / "one.dvc").exists() and (project_root / "two.dvc").exists()
