"""The candidate: both trained models as one bundle, with its training costs.

Shared by the train flow and the `s2s gates` CLI (the dvc.yaml `gates` stage), so a candidate is
assembled the same way with or without Prefect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core import atomic
from core.config import Params
from serving.bundle import export_bundle, read_meta
from tasks.training.cost import cost_metrics
from tasks.training.device import select_device
from tasks.training.train_codec import CodecTrainResult
from tasks.training.train_s2s import S2STrainResult


def bundle_dir(params: Params) -> Path:
    return params.path(params.paths.artifacts) / "bundle"


def export_candidate(params: Params, codec: CodecTrainResult, s2s: S2STrainResult, meta: dict[str, Any]) -> Path:
    """The candidate bundle from both checkpoints; the weights are rewritten only when the
    checkpoints changed (their runs say so), the metadata every time."""
    out = bundle_dir(params)
    sources = {"codec": codec.checkpoint, "s2s": s2s.checkpoint, "codec_run": codec.run_id, "s2s_run": s2s.run_id,
               "codec_steps": codec.steps, "s2s_steps": s2s.steps}
    if (out / "bundle.json").is_file() and read_meta(out).get("sources") == sources:
        atomic.write_json(out / "bundle.json", {**read_meta(out), **meta, "sources": sources})
        return out
    return export_bundle(Path(codec.checkpoint), Path(s2s.checkpoint), out, {**meta, "sources": sources})


def training_costs(params: Params, codec: CodecTrainResult, s2s: S2STrainResult) -> dict[str, float]:
    """Device hours and estimated cost of both trainings (hours x the rate in params.yaml)."""
    codec_cost = cost_metrics(codec.seconds, select_device(params.codec_train.device), params.cost, 1)
    s2s_cost = cost_metrics(s2s.seconds, select_device(params.s2s_train.device), params.cost, 1)
    return {"codec_hours": codec_cost["wall_hours"], "codec_usd": codec_cost["cost_usd"],
            "s2s_hours": s2s_cost["wall_hours"], "s2s_usd": s2s_cost["cost_usd"],
            "total_usd": codec_cost["cost_usd"] + s2s_cost["cost_usd"]}


def load_results(params: Params) -> tuple[CodecTrainResult, S2STrainResult]:
    """The finished trainings' results (result.json), or a FileNotFoundError saying what to run; the
    S2S one is the distilled model's when the profile distils guidance (s2s_distill.steps > 0)."""
    found = []
    s2s_dir = params.s2s_distill.out_dir if params.s2s_distill.steps > 0 else params.s2s_train.out_dir
    for cls, out_dir, command in ((CodecTrainResult, params.codec_train.out_dir, "s2s train codec"),
                                  (S2STrainResult, s2s_dir, "s2s train s2s")):
        path = params.path(out_dir) / "result.json"
        if not path.is_file():
            raise FileNotFoundError(f"no finished training at {path}: run `{command}` first")
        found.append(cls(**json.loads(path.read_text())))
    return found[0], found[1]
