"""Publishing, step 2: talking to the Hugging Face Hub, with the token kept out of every message.

The token is never logged, stored or put in a message: every error raised by huggingface_hub is
re-raised as a PublishError whose text has the token (and anything shaped like one) redacted.

Transport: downloads fall back to plain HTTP by themselves when the server sends no Xet headers.
Uploads do not: with hf_xet installed, huggingface_hub 2.4.0 sends every file the server calls
"lfs" through Xet, so before uploading we ask the server for a Xet write token and, where it
offers none (a self-hosted or older Hub), upload through the classic LFS protocol instead."""

from __future__ import annotations

import importlib.util
import logging
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from core.config import PublishConfig
from core.hashing import file_sha256
from tasks.release.hub_repos import SUMS_FILE, RepoReport
from tasks.release.staging import PublishError

log = logging.getLogger(__name__)

_TOKEN_SHAPES = re.compile(r"(?i)(bearer\s+)[^\s'\"]+|\bhf_[A-Za-z0-9]{8,}")
_XET_LOCK = threading.Lock()
T = TypeVar("T")


def redact(text: str, token: str | None) -> str:
    """`text` with the token, bearer credentials and anything shaped like an HF token replaced.

    Redacting the shapes too covers a server or proxy that echoes a credential other than ours.
    """
    if token:
        text = text.replace(token, "***")
    return _TOKEN_SHAPES.sub(lambda m: f"{m.group(1)}***" if m.group(1) else "***", text)


def _describe(exc: BaseException) -> str:
    """The exception's own words plus, for huggingface_hub's re-raised errors, the server's."""
    text = f"{type(exc).__name__}: {str(exc).strip()}"
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text += f" (caused by {type(cause).__name__}: {str(cause).strip()})"
    return re.sub(r"\s*\n\s*", " ", text)  # one line: the CLI and the Prefect UI show it as is


@contextmanager
def _redacted_logs(token: str | None) -> Iterator[None]:
    """Redact the token from every log record made during the block, whichever library logs it.

    huggingface_hub never logs the token, but at DEBUG level httpcore logs response headers, and a
    server or proxy that echoes the credential would put it there. A record factory sees every
    record (and its traceback) before any handler does.
    """
    if not token:
        yield
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error handling
            return record
        if token in text:
            record.msg, record.args = redact(text, token), ()
        if record.exc_info:
            formatted = logging.Formatter().formatException(record.exc_info)
            if token in formatted:  # handlers print exc_text as given when exc_info is gone
                record.exc_text, record.exc_info = redact(formatted, token), None
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


def _status_code(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _hub_call(what: str, token: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one huggingface_hub call; turn any failure into a PublishError saying what was being done.

    The PublishError is raised outside the `except` block so it carries no __context__: a traceback
    printed later cannot show the original, unredacted message.
    """
    try:
        return fn(*args, **kwargs)
    except PublishError:
        raise
    except Exception as exc:  # HfHubHTTPError, httpx errors, ValueError from the client, OSError...
        error = PublishError(redact(f"{what} failed: {_describe(exc)}", token), _status_code(exc))
    raise error


def _xet_offered(endpoint: str, repo_id: str, token: str) -> bool:
    """Whether uploads can go through Xet: hf_xet installed and enabled, and the server hands out a
    Xet write token for the repo (the Hub does; a server without Xet storage answers 4xx)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    if constants.HF_HUB_DISABLE_XET or importlib.util.find_spec("hf_xet") is None:
        return False
    try:
        response = get_session().get(f"{endpoint}/api/models/{repo_id}/xet-write-token/main",
                                     headers=build_hf_headers(token=token))
    except Exception:  # unreachable now: the upload will say so with a clearer message
        return False
    return response.status_code == 200 and constants.HUGGINGFACE_HEADER_X_XET_ENDPOINT in response.headers


@contextmanager
def _plain_http_uploads(enabled: bool) -> Iterator[None]:
    """Make huggingface_hub upload without Xet for the block (classic LFS over HTTP).

    is_xet_available() reads constants.HF_HUB_DISABLE_XET on every call, so setting it for the
    block is enough; the lock keeps two publishes in one process from restoring it under each other.
    """
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    with _XET_LOCK:
        saved = constants.HF_HUB_DISABLE_XET
        constants.HF_HUB_DISABLE_XET = True
        try:
            yield
        finally:
            constants.HF_HUB_DISABLE_XET = saved


def _verify_remote(api: Any, repo: RepoReport, token: str) -> None:
    """Download every file of the commit just made into a fresh cache and check its sha256.

    A fresh cache means nothing is served from an earlier download; the expected digests are the
    staged SHA256SUMS (and SHA256SUMS's own digest), so a file changed anywhere on the way fails.
    """
    listed = set(_hub_call(f"listing {repo.repo_id}", token, api.list_repo_files, repo.repo_id, revision=repo.commit))
    missing = sorted(set(repo.files) - listed)
    if missing:
        raise PublishError(f"{repo.repo_id}@{repo.commit} lacks {', '.join(missing)} after the upload")
    bad = []
    with tempfile.TemporaryDirectory(prefix="hub-verify-") as cache:
        for name, expected in sorted(repo.files.items()):
            path = _hub_call(f"downloading {name} from {repo.repo_id}", token, api.hf_hub_download, repo.repo_id,
                             name, revision=repo.commit, cache_dir=cache)
            got = file_sha256(Path(path))
            if got != expected:
                bad.append(f"{name} (sha256 {got}, expected {expected})")
    if bad:
        raise PublishError(f"{repo.repo_id}@{repo.commit}: downloaded back, {'; '.join(bad)} did not match "
                           f"{SUMS_FILE}: the Hub does not hold what was uploaded")
    repo.verified = True


def _ensure_repo(api: Any, repo_id: str, cfg: PublishConfig, token: str) -> tuple[str, bool]:
    """Create the repo (or reuse it) and return its URL and whether it is private.

    An existing public repo is refused while publish.private is true: reusing a repo must not
    publish weights the settings say are private.
    """
    url = _hub_call(f"creating repo {repo_id}", token, api.create_repo, repo_id, private=cfg.private, exist_ok=True)
    info = _hub_call(f"reading repo {repo_id}", token, api.repo_info, repo_id)
    private = bool(info.private)
    if cfg.private and not private:
        raise PublishError(f"{repo_id} already exists and is public, but publish.private is true: not uploading. "
                           "Make the repo private on the Hub, or set publish.private=false")
    return str(url), private


def _upload(api: Any, repo: RepoReport, message: str, token: str) -> None:
    info = _hub_call(f"uploading {repo.local_dir} to {repo.repo_id}", token, api.upload_folder,
                     repo_id=repo.repo_id, folder_path=repo.local_dir, commit_message=message)
    repo.commit, repo.commit_url = info.oid, info.commit_url
    log.info("%s: commit %s", repo.repo_id, info.oid)
