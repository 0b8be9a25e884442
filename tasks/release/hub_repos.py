"""What a publish produces on the Hub: two model repos (codec and S2S), their ids, the files each
holds and the endpoint they go to. Shared by staging, the model card, the Hub transport and the
publish report."""

from __future__ import annotations

import os
from dataclasses import dataclass

from core.config import PublishConfig
from serving.bundle import CODEC_FILE, S2S_FILE

DEFAULT_ENDPOINT = "https://huggingface.co"
SUMS_FILE = "SHA256SUMS"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
WEIGHTS = {"codec": CODEC_FILE, "s2s": S2S_FILE}


def hub_endpoint(cfg: PublishConfig) -> str:
    """HF_ENDPOINT, else publish.endpoint, else the public Hub (the order params.yaml documents)."""
    return (os.environ.get("HF_ENDPOINT") or cfg.endpoint or DEFAULT_ENDPOINT).rstrip("/")


def repo_ids(cfg: PublishConfig, namespace: str | None) -> dict[str, str]:
    """`namespace/name` for both repos; a repo name that already has a namespace keeps it."""
    names = {"codec": cfg.codec_repo, "s2s": cfg.s2s_repo}
    owner = namespace or cfg.namespace or "<namespace>"
    return {kind: name if "/" in name else f"{owner}/{name}" for kind, name in names.items()}


@dataclass
class RepoReport:
    """One of the two repos: where it was staged, and where it went."""

    kind: str                          # "codec" or "s2s"
    local_dir: str
    files: dict[str, str]              # name -> sha256, SHA256SUMS included
    repo_id: str | None = None
    url: str | None = None
    commit: str | None = None
    commit_url: str | None = None
    private: bool | None = None
    verified: bool = False
