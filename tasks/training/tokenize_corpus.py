"""Tokenize the corpus with the trained codec: every kept segment's codes, one file per split.

The S2S model trains on codec tokens, not audio; encoding once here keeps S2S training cheap.
The result is stamped with the codec checkpoint's and the manifest's hashes, so it is rebuilt
exactly when either changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core import atomic
from core.checkpoints import load_checkpoint
from core.config import Params
from core.hashing import file_sha256
from models.codecs import Codec, codec_from_config
from tasks.data.corpus_audio import load_clips, read_manifest
from tasks.training.device import select_device

SPLITS = ("train", "val", "test")


def load_codec(checkpoint: Path, device: torch.device | None = None) -> Codec:
    """The trained codec from its checkpoint, in eval mode."""
    state = load_checkpoint(checkpoint)
    model = codec_from_config(state["config"])
    model.load_checkpoint_state(state["model"], state["config"])
    return model.to(device or torch.device("cpu")).eval()


def tokenize_corpus(params: Params, codec_checkpoint: Path | None = None) -> Path:
    """Write artifacts/tokens/{split}.npz (segment_id -> (K, F) int16 codes) and return the folder."""
    data_dir = params.path(params.paths.data)
    checkpoint = codec_checkpoint or params.path(params.codec_train.out_dir) / "last.pt"
    out_dir = params.path(params.tokens.out_dir)
    stamp = {"codec": file_sha256(checkpoint) if checkpoint.is_file() else None,
             "manifest": file_sha256(data_dir / "manifest.csv") if (data_dir / "manifest.csv").is_file() else None}
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no codec checkpoint at {checkpoint}: run `s2s train codec` first")
    read_manifest(data_dir)
    stamp_path = out_dir / "stamp.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return out_dir
    device = select_device(params.s2s_train.device)
    codec = load_codec(checkpoint, device)
    for split in SPLITS:
        clips, ids = load_clips(data_dir, split)
        codes: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for segment_id, clip in tqdm(list(zip(ids, clips)), desc=f"tokenize {split}", unit="seg"):
                wav = torch.from_numpy(clip.astype(np.float32) / 32768.0)[None, None].to(device)
                codes[segment_id] = codec.encode(wav)[0].cpu().numpy().astype(np.int16)
        with atomic.atomic_path(out_dir / f"{split}.npz", suffix=".npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **codes)
    atomic.write_json(out_dir / "codec_config.json", codec.config_dict())
    atomic.write_json(stamp_path, stamp)
    return out_dir


def load_tokens(out_dir: Path, split: str) -> dict[str, np.ndarray]:
    with np.load(out_dir / f"{split}.npz") as handle:
        return {k: handle[k] for k in handle.files}

