"""Publishing, step 1: the two model-repo folders (codec/ and s2s/) staged locally from a bundle,
each with its weights, config, bundle.json, model card and SHA256SUMS, and each appearing whole
or not at all. What leaves the machine is exactly what is staged here and checked against its
sums, which is also how the Hub copy is verified after the upload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from core import atomic
from core.config import PublishConfig
from core.hashing import file_sha256
from serving.bundle import CODEC_FILE, META_FILE, S2S_FILE, BundleError, read_meta
from tasks.release.hub_repos import CARD_FILE, CONFIG_FILE, SUMS_FILE, WEIGHTS, repo_ids
from tasks.release.model_card import model_card


class PublishError(RuntimeError):
    """Publishing failed; the message says which step and repo, with the token redacted."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def write_sums(folder: Path) -> Path:
    """SHA256SUMS of every other file in `folder`, in `sha256sum` format (`sha256sum -c` reads it)."""
    lines = [f"{file_sha256(p)}  {p.name}\n" for p in sorted(folder.iterdir())
             if p.is_file() and p.name != SUMS_FILE]
    target = folder / SUMS_FILE
    target.write_text("".join(lines), encoding="utf-8")
    return target


def read_sums(path: Path) -> dict[str, str]:
    """name -> sha256 from a SHA256SUMS file (text or binary mode markers both accepted)."""
    sums = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*").strip()] = digest.lower()
    return sums


def verify_folder(folder: Path) -> dict[str, str]:
    """Check every file SHA256SUMS lists; return name -> sha256 for all files, SHA256SUMS included."""
    folder = Path(folder)
    sums = read_sums(folder / SUMS_FILE)
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise PublishError(f"{folder}: {name} is listed in {SUMS_FILE} but missing")
        if file_sha256(path) != digest:
            raise PublishError(f"{path} does not match its sha256 in {SUMS_FILE}")
    return {**sums, SUMS_FILE: file_sha256(folder / SUMS_FILE)}


def _published_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """bundle.json as published: without `sources`, which are paths on the training machine.

    The sha256 entries (what load_bundle checks) cover only the weights, so they still hold.
    """
    return {k: v for k, v in meta.items() if k != "sources"}


def _check_weights(bundle_dir: Path, meta: dict[str, Any]) -> None:
    """Refuse to publish weights that do not match the sha256 bundle.json recorded at export."""
    for name in (CODEC_FILE, S2S_FILE):
        path = bundle_dir / name
        if not path.is_file():
            raise PublishError(f"{bundle_dir} is not a complete bundle: {name} is missing")
        if meta.get("sha256", {}).get(name) != file_sha256(path):
            raise PublishError(f"{path} does not match the sha256 in {META_FILE}: corrupt or replaced, not publishing")


def stage_repos(bundle_dir: Path, cfg: PublishConfig, out_dir: Path, namespace: str | None = None) -> dict[str, Path]:
    """Write the codec/ and s2s/ repo folders under `out_dir`; each is built aside and renamed in.

    `namespace` only fills in the repo ids the model cards link to (cfg.namespace, else a placeholder).
    """
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    try:
        meta = read_meta(bundle_dir)
    except BundleError as exc:
        raise PublishError(str(exc)) from None
    _check_weights(bundle_dir, meta)
    states = {kind: torch.load(bundle_dir / name, map_location="cpu", weights_only=True)
              for kind, name in WEIGHTS.items()}
    configs = {"codec": dict(states["codec"]["config"]),
               "s2s": {**states["s2s"]["config"], "codec_config": states["s2s"]["codec_config"]}}
    params = {kind: sum(t.numel() for t in state["model"].values() if torch.is_tensor(t))
              for kind, state in states.items()}
    ids = repo_ids(cfg, namespace)
    staged = {}
    for kind, weights in WEIGHTS.items():
        with atomic.atomic_dir(out_dir / kind) as tmp:
            shutil.copyfile(bundle_dir / weights, tmp / weights)
            (tmp / CONFIG_FILE).write_text(json.dumps(configs[kind], indent=2, default=str) + "\n", encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(_published_meta(meta), indent=2, default=str) + "\n",
                                         encoding="utf-8")
            (tmp / CARD_FILE).write_text(model_card(kind, meta, cfg, configs, params, ids), encoding="utf-8")
            write_sums(tmp)
        staged[kind] = out_dir / kind
    return staged
