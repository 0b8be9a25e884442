"""Per-file digests of the corpus (sha256 and size), so a corpus that differs names its files.

DVC's hash of data/ says only *that* two corpora differ (one byte of 86 MB, on one machine);
`data.digests` at the project root, committed beside data.dvc, lists every file with its sha256
and size, and `compare` turns two listings into the files that differ. `s2s corpus digests
--check` runs it on the corpus on disk; the data flow warns with the names when they differ.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from core import atomic

DIGESTS_FILE = "data.digests"


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digests(folder: Path) -> dict[str, FileDigest]:
    """Every file under `folder` by its POSIX path relative to it (DVC ignores nothing in data/)."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): FileDigest(_sha256(path), path.stat().st_size)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def render(digests: dict[str, FileDigest]) -> str:
    header = ("# sha256, size in bytes and path of every file of data/ (the corpus data.dvc pins);\n"
              "# written by `s2s corpus digests --write`, checked by tests and `s2s corpus digests --check`\n")
    return header + "".join(f"{d.sha256}  {d.size:>10}  {path}\n" for path, d in sorted(digests.items()))


def parse(text: str) -> dict[str, FileDigest]:
    digests: dict[str, FileDigest] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) != 3 or len(parts[0]) != 64 or not parts[1].isdigit():
            raise ValueError(f"digest list line {number}: expected 'sha256 size path', got {line!r}")
        digests[parts[2]] = FileDigest(parts[0], int(parts[1]))
    return digests


def read(path: Path) -> dict[str, FileDigest]:
    return parse(Path(path).read_text(encoding="utf-8"))


def write(path: Path, digests: dict[str, FileDigest]) -> Path:
    return atomic.write_text(path, render(digests))


def compare(expected: dict[str, FileDigest], actual: dict[str, FileDigest]) -> list[str]:
    """One line per differing file (changed, missing, unexpected); empty when identical."""
    lines = []
    for path in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(path), actual.get(path)
        if want == got:
            continue
        if got is None:
            lines.append(f"missing: {path}")
        elif want is None:
            lines.append(f"unexpected: {path} ({got.size} bytes)")
        else:
            lines.append(f"differs: {path} ({want.size} -> {got.size} bytes, sha256 {want.sha256[:12]} -> "
                         f"{got.sha256[:12]})")
    return lines
