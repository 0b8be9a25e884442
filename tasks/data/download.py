"""Download every source with yt-dlp: a download archive (nothing fetched twice), retries, an
optional rate limit, and one clear error per failed item while the other items go on.

Recordings are found afterwards on disk (one folder per source), so an item downloaded by an
earlier run, and skipped by the archive this time, is still part of the corpus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yt_dlp
from tqdm import tqdm
from yt_dlp.utils import parse_bytes

from core.config import DownloadConfig
from tasks.data.sources import Source

_SKIP_SUFFIXES = (".info.json", ".part", ".ytdl", ".temp", ".tmp")


@dataclass(frozen=True)
class Recording:
    """One downloaded media file and the source it came from."""

    source_id: str
    recording_id: str
    media_path: Path


@dataclass(frozen=True)
class DownloadFailure:
    source_id: str
    url: str
    error: str


@dataclass
class DownloadReport:
    recordings: list[Recording] = field(default_factory=list)
    failures: list[DownloadFailure] = field(default_factory=list)


class _ErrorCollector:
    """A yt-dlp logger that keeps the error messages (one per failed item) instead of printing."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def debug(self, msg: str) -> None:
        pass

    info = debug

    def warning(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        self.errors.append(re.sub(r"\x1b\[[0-9;]*m", "", msg).removeprefix("ERROR: ").strip())


def _options(cfg: DownloadConfig, out_dir: Path, archive: Path, source: Source, logger: _ErrorCollector) -> dict:
    options = {
        "enable_file_urls": True,
        "download_archive": str(archive),
        "outtmpl": str(out_dir / source.id / "%(extractor)s-%(id)s.%(ext)s"),
        "format": cfg.format,
        "retries": cfg.retries,
        "fragment_retries": cfg.retries,
        "extractor_retries": cfg.retries,
        "retry_sleep_functions": {"http": lambda n: min(0.2 * 2**n, 5.0)},
        "socket_timeout": cfg.socket_timeout_s,
        "writeinfojson": True,
        "ignoreerrors": True,  # one failed playlist item must not stop the others
        "noprogress": True,
        "quiet": True,
        "no_warnings": True,
        "logger": logger,
        "restrictfilenames": True,
    }
    if cfg.rate_limit:
        options["ratelimit"] = parse_bytes(cfg.rate_limit)
    return options


def recordings_on_disk(out_dir: Path, source: Source) -> list[Recording]:
    """The complete media files of one source (partial downloads are ignored)."""
    folder = out_dir / source.id
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name.endswith(_SKIP_SUFFIXES):
            continue
        found.append(Recording(source.id, f"{source.id}--{path.stem}", path))
    return found


def download_sources(sources: list[Source], cfg: DownloadConfig, out_dir: Path, archive: Path) -> DownloadReport:
    """Fetch every source; failures are collected per item with yt-dlp's message."""
    out_dir.mkdir(parents=True, exist_ok=True)
    archive.parent.mkdir(parents=True, exist_ok=True)
    report = DownloadReport()
    for source in tqdm(sources, desc="download", unit="source"):
        logger = _ErrorCollector()
        try:
            with yt_dlp.YoutubeDL(_options(cfg, out_dir, archive, source, logger)) as ydl:
                ydl.extract_info(source.url, download=True)
        except Exception as exc:  # yt-dlp raises for bad URLs even with ignoreerrors
            logger.errors.append(f"{type(exc).__name__}: {exc}")
        for message in logger.errors:
            report.failures.append(DownloadFailure(source.id, source.url, message))
        report.recordings.extend(recordings_on_disk(out_dir, source))
    return report
