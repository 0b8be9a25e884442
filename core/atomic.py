"""Atomic, durable writes: a reader (or a crash, or a power cut) never sees half a file or half a folder.

Every output of the pipeline goes through these helpers: the content is written beside the
target under a temporary name, flushed to disk (fsync), and renamed over the target, which
POSIX makes atomic on one filesystem; then the directory is fsynced, so the rename itself
survives a power cut (without it, ext4 and xfs may come back with the old name or neither).

A folder is swapped in with one `renameat2(RENAME_EXCHANGE)` (Linux 3.15+; ext4, xfs, btrfs,
tmpfs): the target name always points at a whole folder, the old one or the new one. Where the
filesystem refuses the exchange, two renames are the fallback; a crash between them leaves
`.NAME.old`, which `recover_dir` (called before every swap and by readers such as the pipeline's
workspace lock) renames back.

A write that fails for want of space raises DiskFullError naming the path and the free space;
the previous target is untouched, since it is only ever replaced by a complete file.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """Out of space while writing `path`: the message names the path and the space left."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        usage = _usage(Path(path).parent)
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}: {usage} "
                                       f"(the previous {Path(path).name}, if any, is intact): {cause}")
        self.path = Path(path)


def _usage(folder: Path) -> str:
    try:
        total, _used, free = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{free / 2**20:.1f} MiB free of {total / 2**20:.1f} MiB"


def _is_no_space(exc: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT, also when a library (torch.save, libsndfile) wrapped it in its own error."""
    if isinstance(exc, DiskFullError):
        return False  # already explained
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    text = str(exc).lower()
    if "no space left" in text or "disk quota" in text:
        return True
    # torch.save on a full disk says "[enforce fail at inline_container.cc:672] . unexpected pos
    # 8640 vs 8534": whatever the words, a write that failed with the filesystem full is that
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's content and metadata to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (deepest first) and `root` itself."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


@contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; fsync it and rename it over `target` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    except OSError as exc:
        raise (DiskFullError(target, exc) if _is_no_space(exc, target.parent) else exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except Exception as exc:
        if _is_no_space(exc, target.parent):  # measured while the temporary still holds its space
            tmp.unlink(missing_ok=True)
            raise DiskFullError(target, exc) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: Path, payload: Any) -> Path:
    return write_text(target, json.dumps(payload, ensure_ascii=False, indent=2, default=str) + "\n")


def write_jsonl(target: Path, rows: list[dict[str, Any]]) -> Path:
    return write_text(target, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def write_wav(target: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM WAV, the corpus's one audio format."""
    with atomic_path(target, suffix=".wav") as tmp:
        sf.write(tmp, np.asarray(audio, dtype=np.float32), sample_rate, subtype="PCM_16", format="WAV")
    return Path(target)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it (glibc < 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False  # this filesystem (or kernel) cannot exchange: use the fallback
    raise OSError(code, f"renameat2({a}, {b}, RENAME_EXCHANGE) failed: {os.strerror(code)}")


def _old_name(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def recover_dir(target: Path) -> bool:
    """Put back a folder that a crash in the two-rename fallback left as `.NAME.old`; True if it did."""
    target, old = Path(target), _old_name(Path(target))
    if not target.exists() and old.is_dir():
        os.replace(old, target)
        fsync_path(target.parent)
        return True
    return False


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a folder under a temporary name, then swap it in place of `target` at the end.

    The staging folder is fsynced whole, exchanged with `target` in one step (see the module
    docstring), and the old folder, now under the staging name, is removed. If the block fails,
    the staging folder is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.build.", dir=target.parent))
    except OSError as exc:
        raise (DiskFullError(target, exc) if _is_no_space(exc, target.parent) else exc) from exc
    try:
        yield staging
        fsync_tree(staging)
    except Exception as exc:
        full = _is_no_space(exc, target.parent)  # before the staging folder frees its space
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise DiskFullError(target, exc) from exc
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists() and _exchange(staging, target):
        fsync_path(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # the old folder, under the staging name now
        return
    old = _old_name(target)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)
