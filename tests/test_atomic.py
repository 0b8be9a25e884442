"""core.atomic under crashes: files and folders are fsynced, a folder swap has no moment without
the target, a crash in the fallback is recovered, and a full disk names the path and the space."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core import atomic

REPO = Path(__file__).resolve().parent.parent


def _fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every descriptor fsync is called on."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_a_file_and_its_directory_are_fsynced_on_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seen = _fsynced(monkeypatch)
    target = tmp_path / "out" / "report.json"
    atomic.write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert any(Path(p).name.startswith(".report.json.") for p in seen), "the file's data before the rename"
    assert str(target.parent) in seen, "the directory after the rename"
    assert not [p for p in target.parent.iterdir() if p.name != "report.json"], "no temporary left"


def test_a_folder_swap_fsyncs_the_new_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seen = _fsynced(monkeypatch)
    with atomic.atomic_dir(tmp_path / "corpus") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "a.txt").write_text("new")
    assert (tmp_path / "corpus" / "sub" / "a.txt").read_text() == "new"
    assert any(p.endswith("/sub/a.txt") for p in seen) and str(tmp_path) in seen


# A child process that swaps a folder in and SIGKILLs itself on the first rename of a folder, the
# point where the old two-rename swap had moved the old folder aside and not yet put the new one in.
KILLED_SWAP = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from core import atomic
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if Path(dst).name in ("corpus", ".corpus.old"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    real_exchange = getattr(atomic, "_exchange", None)
    def exchange(a, b):
        if real_exchange(a, b):
            os.kill(os.getpid(), signal.SIGKILL)
        return False
    if real_exchange:
        atomic._exchange = exchange
    with atomic.atomic_dir(Path(sys.argv[1]) / "corpus") as staging:
        (staging / "version.txt").write_text("new")
""")


def _killed_swap(tmp_path: Path) -> int:
    return subprocess.run([sys.executable, "-c", KILLED_SWAP, str(tmp_path)], cwd=REPO).returncode


def test_a_kill_during_a_folder_swap_never_leaves_no_target(tmp_path: Path):
    with atomic.atomic_dir(tmp_path / "corpus") as staging:
        (staging / "version.txt").write_text("old")
    assert _killed_swap(tmp_path) == -signal.SIGKILL
    target = tmp_path / "corpus"
    assert target.is_dir(), f"no target folder after a kill mid-swap: {sorted(p.name for p in tmp_path.iterdir())}"
    assert (target / "version.txt").read_text() in ("old", "new")


def test_a_crash_in_the_fallback_swap_is_recovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Where renameat2 cannot exchange (some filesystems), a kill between the two renames leaves
    `.NAME.old`; the next swap (or recover_dir) puts it back before anything reads the target."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic.atomic_dir(tmp_path / "corpus") as staging:
        (staging / "version.txt").write_text("old")
    os.replace(tmp_path / "corpus", tmp_path / ".corpus.old")  # the state such a kill leaves
    assert atomic.recover_dir(tmp_path / "corpus")
    assert (tmp_path / "corpus" / "version.txt").read_text() == "old"
    with atomic.atomic_dir(tmp_path / "corpus") as staging:
        (staging / "version.txt").write_text("new")
    assert (tmp_path / "corpus" / "version.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_a_failed_block_leaves_the_old_folder(tmp_path: Path):
    with atomic.atomic_dir(tmp_path / "corpus") as staging:
        (staging / "version.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(tmp_path / "corpus") as staging:
            (staging / "version.txt").write_text("half")
            raise RuntimeError("crash")
    assert (tmp_path / "corpus" / "version.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_disk_full_names_the_path_and_space(tmp_path: Path):
    """A write that runs out of space (simulated by the OSError the kernel gives) says where and
    how much is left, and the previous file stays whole; the chaos suite does it on a real tmpfs."""
    target = tmp_path / "model.pt"
    atomic.write_text(target, "previous")
    with pytest.raises(atomic.DiskFullError, match=r"no space left on device while writing .*model\.pt: .* MiB free"):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
