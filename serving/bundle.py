"""The model bundle: TeluCodec and the S2S transformer together, as one loadable unit.

A bundle is a folder of three files, the unit the registry versions, the server loads and the
publisher uploads:

    codec.pt     {"config": codec config, "model": state dict}    weights only, no optimizer
    s2s.pt       {"config": S2S config, "codec_config": ..., "model": state dict}
    bundle.json  what it is: metrics, gates, corpus hash, git commit, profile, sha256 of the weights

Training checkpoints carry optimizer and RNG state for exact resume; a bundle drops them (a
smaller artifact, loadable with torch.load(weights_only=True)). The S2S checkpoint names the codec
config it was trained on, and loading refuses a pair that do not belong together.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core import atomic
from core.config import find_root
from core.hashing import file_sha256
from core.tracking import tracking_uri as default_tracking_uri
from models.codecs import Codec, codec_from_config
from models.s2s_transformer import S2SConfig, S2STransformer

CODEC_FILE = "codec.pt"
S2S_FILE = "s2s.pt"
META_FILE = "bundle.json"


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message says which file and why."""




@dataclass
class ModelBundle:
    """The two models in eval mode, and the bundle's metadata."""

    codec: Codec
    s2s: S2STransformer
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sample_rate(self) -> int:
        return self.codec.config.sample_rate

    def to(self, device: torch.device | str) -> "ModelBundle":
        self.codec.to(device)
        self.s2s.to(device)
        return self


def export_bundle(codec_checkpoint: Path, s2s_checkpoint: Path, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write a bundle from the two training checkpoints; the folder appears whole or not at all."""
    codec_state = torch.load(codec_checkpoint, map_location="cpu", weights_only=False)
    s2s_state = torch.load(s2s_checkpoint, map_location="cpu", weights_only=False)
    if s2s_state.get("codec_config") != codec_state["config"]:
        raise BundleError(f"{s2s_checkpoint} was trained on tokens of another codec than {codec_checkpoint}: "
                          "retrain the S2S model on this codec's tokens")
    with atomic.atomic_dir(out_dir) as tmp:
        torch.save({"config": codec_state["config"], "model": codec_state["model"]}, tmp / CODEC_FILE)
        torch.save({"config": s2s_state["config"], "codec_config": s2s_state["codec_config"],
                    "model": s2s_state["model"]}, tmp / S2S_FILE)
        sha = {name: file_sha256(tmp / name) for name in (CODEC_FILE, S2S_FILE)}
        (tmp / META_FILE).write_text(json.dumps({**meta, "sha256": sha}, indent=2, default=str) + "\n")
    return out_dir


def bundle_sha(bundle_dir: Path) -> str:
    """One hash for the weights of a bundle: what the registry uses to spot a re-registration."""
    return meta_sha(read_meta(bundle_dir))


def meta_sha(meta: dict[str, Any]) -> str:
    """bundle_sha from a bundle's metadata already read (the sha256 of its weights' sha256s)."""
    return hashlib.sha256(json.dumps(meta["sha256"], sort_keys=True).encode()).hexdigest()[:32]


def recorded_sampling(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The sampling settings chosen for this model on the validation split, when it has them."""
    return (meta.get("sampling") or {}).get("chosen")


def read_meta(bundle_dir: Path) -> dict[str, Any]:
    path = Path(bundle_dir) / META_FILE
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a model bundle: {META_FILE} is missing")
    return json.loads(path.read_text())


def load_bundle_dir(bundle_dir: Path, device: torch.device | str = "cpu", verify: bool = True) -> ModelBundle:
    """Load a bundle folder; with `verify`, the weights must match the sha256 in bundle.json."""
    bundle_dir = Path(bundle_dir)
    meta = read_meta(bundle_dir)
    for name in (CODEC_FILE, S2S_FILE):
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{bundle_dir} is missing {name}")
        if verify and meta.get("sha256", {}).get(name) != file_sha256(path):
            raise BundleError(f"{path} does not match the sha256 recorded in {META_FILE}: corrupt or replaced")
    codec_state = torch.load(bundle_dir / CODEC_FILE, map_location="cpu", weights_only=True)
    s2s_state = torch.load(bundle_dir / S2S_FILE, map_location="cpu", weights_only=True)
    if s2s_state["codec_config"] != codec_state["config"]:
        raise BundleError(f"{bundle_dir}: the S2S model was trained on another codec's tokens")
    codec = codec_from_config(codec_state["config"])
    codec.load_checkpoint_state(codec_state["model"], codec_state["config"])
    s2s_config = S2SConfig(**s2s_state["config"])
    if (s2s_config.n_codebooks, s2s_config.codebook_size) != (codec.config.n_codebooks, codec.config.codebook_size):
        raise BundleError(f"{bundle_dir}: S2S vocabulary does not match the codec's codebooks")
    s2s = S2STransformer(s2s_config)
    s2s.load_state_dict(s2s_state["model"])
    return ModelBundle(codec.eval(), s2s.eval(), meta).to(device)


def load_bundle(source: str | Path, device: torch.device | str = "cpu", tracking_uri: str | None = None) -> ModelBundle:
    """A bundle from a folder, or from the MLflow registry (`models:/<name>@<alias>` or
    `models:/<name>/<version>`): the registered model's `bundle` artifact folder."""
    text = str(source)
    if text.startswith("models:/") or text.startswith("runs:/"):
        return load_bundle_dir(download_bundle(text, tracking_uri), device)
    path = Path(text).expanduser()
    if not path.exists():
        raise BundleError(f"no model bundle at {path}")
    return load_bundle_dir(path, device)


def download_bundle(uri: str, tracking: str | None = None) -> Path:
    """The `bundle` folder of a registered model (models:/name@alias, models:/name/N) or a run's
    model, downloaded from the MLflow store (`tracking`, else the project's default store)."""
    import mlflow  # heavy: only when a bundle comes from the registry

    uri_store = tracking or default_tracking_uri(find_root(), None)
    mlflow.set_tracking_uri(uri_store)
    mlflow.set_registry_uri(uri_store)
    target = Path(tempfile.mkdtemp(prefix="s2s-bundle-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as exc:  # MlflowException: no such model, alias or version
        raise BundleError(f"cannot load {uri} from the MLflow store at {uri_store}: {exc}") from exc
    found = sorted(local.rglob("bundle.json"))
    if not found:
        raise BundleError(f"{uri} holds no model bundle (no bundle.json among its artifacts)")
    return found[0].parent


def bundle_meta_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The short form of a bundle's metadata that /stats and logs show."""
    return {k: meta.get(k) for k in ("model_name", "version", "profile", "git_commit", "corpus_hash")}


__all__ = ["BundleError", "ModelBundle", "export_bundle", "load_bundle", "load_bundle_dir", "read_meta",
           "bundle_sha", "meta_sha", "download_bundle"]
