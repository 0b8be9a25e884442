"""Publish a model bundle to the Hugging Face Hub as two model repos: the codec and the S2S model.

    <out_dir>/codec/   codec.pt  config.json  bundle.json  README.md  SHA256SUMS
    <out_dir>/s2s/     s2s.pt    config.json  bundle.json  README.md  SHA256SUMS
    <out_dir>/publish.json   what the last attempt did (mode local / hub / failed)

The repo folders are always staged locally first (staging.py; their model cards: model_card.py).
With a token (the variable `publish.token_env` names), both repos are created (or reused),
uploaded, then downloaded back at the commit just made and every file checked against SHA256SUMS
(hub.py): a publish that cannot be read back identically is an error, not a success. Without a
token nothing leaves the machine and the report says where the folders are and which variable to
set. The token never appears in a message or a log (hub.py says how)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core import atomic
from core.config import PublishConfig
from serving.bundle import bundle_sha, read_meta
from tasks.release.hub import (_ensure_repo, _hub_call, _plain_http_uploads, _redacted_logs, _upload, _verify_remote,
                               _xet_offered, redact)
from tasks.release.hub_repos import RepoReport, hub_endpoint, repo_ids
from tasks.release.staging import PublishError, stage_repos, verify_folder

log = logging.getLogger(__name__)

REPORT_FILE = "publish.json"


@dataclass
class PublishReport:
    """What publish_bundle did; `asdict` gives the JSON written to publish.json."""

    mode: str                          # "local" (nothing uploaded), "hub", or "failed"
    message: str
    bundle_dir: str
    out_dir: str
    model_name: str
    version: str | None
    bundle_sha: str
    endpoint: str
    token_env: str
    repos: list[RepoReport] = field(default_factory=list)
    verified: bool = False
    transport: str | None = None       # "xet" or "http" for the upload; None when nothing was uploaded


def _push(bundle_dir: Path, cfg: PublishConfig, out_dir: Path, token: str, report: PublishReport) -> None:
    """The hub path: namespace, staging with the real repo ids, repos, upload, read-back check."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=report.endpoint, token=token)
    user = _hub_call(f"checking the token in ${cfg.token_env} against {report.endpoint}", token, api.whoami)
    namespace = cfg.namespace or user["name"]
    staged = stage_repos(bundle_dir, cfg, out_dir, namespace=namespace)
    ids = repo_ids(cfg, namespace)
    report.repos = [RepoReport(kind, str(folder), verify_folder(folder), repo_id=ids[kind])
                    for kind, folder in staged.items()]
    for repo in report.repos:
        repo.url, repo.private = _ensure_repo(api, repo.repo_id, cfg, token)
    xet = _xet_offered(report.endpoint, report.repos[0].repo_id, token)
    report.transport = "xet" if xet else "http"
    version = f" v{report.version}" if report.version else ""
    commit_message = f"Publish {report.model_name}{version} (bundle {report.bundle_sha[:12]})"
    with _plain_http_uploads(not xet):
        for repo in report.repos:
            log.info("uploading %s to %s (%s)", repo.local_dir, repo.repo_id, report.transport)
            _upload(api, repo, commit_message, token)
    for repo in report.repos:
        _verify_remote(api, repo, token)
    report.verified = True


def publish_bundle(bundle_dir: Path, cfg: PublishConfig, root_out_dir: Path, token: str | None = None) -> PublishReport:
    """Stage both repos under `root_out_dir` and, with a token, publish and verify them.

    `token` defaults to the variable cfg.token_env names. Without one (or with publishing disabled,
    or huggingface_hub in offline mode) the report's mode is "local" and its message says why and
    where the folders are. Any failure writes a "failed" publish.json, then raises PublishError.
    """
    bundle_dir, out_dir = Path(bundle_dir), Path(root_out_dir)
    token = (token or os.environ.get(cfg.token_env) or "").strip() or None
    meta = read_meta(bundle_dir)
    report = PublishReport(mode="local", message="", bundle_dir=str(bundle_dir), out_dir=str(out_dir),
                           model_name=str(meta.get("model_name", "telugu-s2s")),
                           version=None if meta.get("version") is None else str(meta["version"]),
                           bundle_sha=bundle_sha(bundle_dir), endpoint=hub_endpoint(cfg), token_env=cfg.token_env)
    try:
        reason = _local_reason(cfg, token)
        if reason is None:
            with _redacted_logs(token):
                _push(bundle_dir, cfg, out_dir, token, report)  # type: ignore[arg-type]
            report.mode = "hub"
            report.message = (f"published {report.model_name} to " +
                              " and ".join(f"{r.url} (commit {r.commit[:12] if r.commit else '?'})" for r in report.repos)
                              + f", downloaded back and verified; local copy in {out_dir}")
        else:
            staged = stage_repos(bundle_dir, cfg, out_dir)
            report.repos = [RepoReport(kind, str(folder), verify_folder(folder)) for kind, folder in staged.items()]
            report.message = (f"{reason}, so nothing was uploaded: the model repos were written to "
                              f"{out_dir / 'codec'} and {out_dir / 's2s'}")
    except PublishError as exc:
        report.mode, report.message, report.verified = "failed", redact(str(exc), token), False
        atomic.write_json(out_dir / REPORT_FILE, asdict(report))
        log.error("publish failed: %s", report.message)
        raise
    atomic.write_json(out_dir / REPORT_FILE, asdict(report))
    log.info("%s", report.message)
    return report


def _local_reason(cfg: PublishConfig, token: str | None) -> str | None:
    """Why this publish stays local, in words; None when it goes to the Hub."""
    from huggingface_hub import constants

    if not cfg.enabled:
        return "publishing is disabled (publish.enabled is false)"
    if token is None:
        return (f"no Hugging Face token: the environment variable {cfg.token_env} is not set "
                f"(set it to a write token to publish to {hub_endpoint(cfg)})")
    if constants.is_offline_mode():
        return f"huggingface_hub is in offline mode (HF_HUB_OFFLINE is set); unset it to publish with ${cfg.token_env}"
    return None
