"""Per-file digests of the corpus (sha256 and size), so a corpus that differs names its files.

DVC's hash of data/ says only *that* two corpora differ (one byte of 86 MB, on one machine);
`data.digests` at the project root, committed beside data.dvc, lists every file with its sha256
and size, and `compare` turns two listings into the files that differ. `s2s corpus digests
--check` runs it on the corpus on disk; the data flow warns with the names when they differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core import atomic
from core.hashing import file_sha256

DIGESTS_FILE = "data.digests"


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int


def tree_digests(folder: Path) -> dict[str, FileDigest]:
    """Every file under `folder` by its POSIX path relative to it (DVC ignores nothing in data/)."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): FileDigest(file_sha256(path), path.stat().st_size)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def tool_versions() -> dict[str, str]:
    """What computes the corpus: a machine whose corpus differs can be told whether its tools do.
    (The Debian packages are not pinned by setup.sh: a later point release of ffmpeg or espeak-ng
    may change audio, and through rounding a figure in the manifest.)"""
    import subprocess
    from importlib import metadata

    versions = {}
    for tool, args in (("ffmpeg", ["ffmpeg", "-version"]), ("espeak-ng", ["espeak-ng", "--version"])):
        try:
            versions[tool] = subprocess.run(args, capture_output=True, text=True).stdout.splitlines()[0][:80]
        except (OSError, IndexError):
            versions[tool] = "missing"
    for package in ("numpy", "torch", "torchaudio", "silero-vad", "soundfile", "pandas", "scikit-learn",
                    "great-expectations", "yt-dlp"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def render(digests: dict[str, FileDigest], versions: dict[str, str] | None = None) -> str:
    header = ("# sha256, size in bytes and path of every file of data/ (the corpus data.dvc pins);\n"
              "# written by `s2s corpus digests --write`, checked by tests and `s2s corpus digests --check`\n")
    header += "".join(f"# tool {name}: {value}\n" for name, value in (versions or {}).items())
    return header + "".join(f"{d.sha256}  {d.size:>10}  {path}\n" for path, d in sorted(digests.items()))


def recorded_versions(text: str) -> dict[str, str]:
    """The `# tool NAME: VERSION` lines of a digest list."""
    return dict(line[len("# tool "):].split(": ", 1) for line in text.splitlines() if line.startswith("# tool "))


def version_differences(listing: Path) -> list[str]:
    """Tools whose version here differs from the one the digest list was written with."""
    recorded, here = recorded_versions(Path(listing).read_text(encoding="utf-8")), tool_versions()
    return [f"{name}: {recorded[name]!r} when written, {here.get(name)!r} here"
            for name in recorded if recorded[name] != here.get(name)]


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
    return atomic.write_text(path, render(digests, tool_versions()))


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
