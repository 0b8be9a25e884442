"""Sampling settings chosen on the validation split, never on the test split the sign-off reads.

Temperature, top-k and guidance trade intelligibility against variety and voice control, and the
best trade depends on how far the model trained, so each model gets its own: every candidate
makes replies to validation-split user turns (all 9 emotions and 4 speakers, as the quality
evaluation does), the judges score them, and the candidate with the fewest errors wins, errors
being intelligibility CER + (1 - speaker control) + (1 - emotion control), each in [0, 1].
MOS is not a criterion and is not computed: it took three quarters of a candidate's time, which
now buys more turns (three turns could not tell the settings apart; docs/history.md).
Choosing among a few decoding settings is model selection, not training: the judges' outputs
never become a training target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core import atomic
from core.config import Params
from serving.bundle import ModelBundle, bundle_sha, load_bundle_dir, read_meta
from tasks.evaluation.model_quality import (Judges, generate_replies, judge, load_judges, reply_requests,
                                            torch_threads)


def sampling_errors(figures: dict[str, float]) -> float:
    """The selection criterion: the sum of the three error rates (lower is better)."""
    return (figures.get("intelligibility_cer", figures.get("cer", 1.0))
            + (1.0 - figures.get("speaker_accuracy", 0.0)) + (1.0 - figures.get("emotion_accuracy", 0.0)))


def search_sampling(bundle: ModelBundle, params: Params, judges: Judges,
                    candidates: list[dict[str, Any]], inputs: int) -> dict[str, Any]:
    """Score each candidate ({temperature, top_k, guidance}) on `inputs` validation turns; return
    the rows and the chosen settings."""
    if not candidates:
        raise ValueError("no sampling candidates to search: give at least one {temperature, top_k}")
    for candidate in candidates:
        unknown = set(candidate) - {"temperature", "top_k", "guidance"}
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {sorted(unknown)}: use temperature, top_k, guidance")
    requests = reply_requests(params, inputs, split="val")
    rows = []
    for candidate in candidates:
        evaluation = params.evaluation.model_copy(update={k: v for k, v in candidate.items() if k != "guidance"})
        serving = params.serving.model_copy(update={"guidance": candidate.get("guidance", params.serving.guidance)})
        trial = params.model_copy(update={"evaluation": evaluation, "serving": serving})
        figures, _ = judge(generate_replies(bundle, requests, trial), judges, mos=False)
        rows.append({"settings": {"temperature": evaluation.temperature, "top_k": evaluation.top_k,
                                  "guidance": serving.guidance},
                     "intelligibility_cer": figures.get("intelligibility_cer"),
                     "speaker_control": figures.get("speaker_accuracy"),
                     "emotion_control": figures.get("emotion_accuracy"),
                     "errors": sampling_errors(figures), "replies": figures.get("items")})
    best = min(rows, key=lambda r: r["errors"])
    return {"split": "val", "inputs": len(requests), "rows": rows, "chosen": best["settings"],
            "criterion": "intelligibility CER + (1 - speaker control) + (1 - emotion control)"}


def choose_sampling(bundle_dir: Path, params: Params, parent_run_id: str | None = None,
                    use_mlflow: bool = True) -> dict[str, Any] | None:
    """Search the profile's candidates for this bundle (once: the result is kept beside its quality
    report) and record the choice in its bundle.json, where the quality evaluation, serving and
    the pyfunc read it. Returns the search (None without candidates)."""
    cfg = params.evaluation
    if not cfg.sampling_candidates:
        return None
    bundle_id = bundle_sha(bundle_dir)
    out = params.path(cfg.out_dir) / bundle_id / "sampling.json"
    with torch_threads(cfg.threads):
        judges = load_judges(params, parent_run_id, use_mlflow)
        stamp = {"candidates": cfg.sampling_candidates, "inputs": cfg.sampling_inputs, "judges": judges.checkpoints,
                 "evaluation": cfg.model_dump(mode="json", exclude={"temperature", "top_k", "reply_draws"})}
        stored = json.loads(out.read_text()) if out.is_file() else {}
        if stored.get("stamp") != json.loads(json.dumps(stamp, default=str)):
            stored = {**search_sampling(load_bundle_dir(bundle_dir), params, judges, cfg.sampling_candidates,
                                        cfg.sampling_inputs), "stamp": json.loads(json.dumps(stamp, default=str))}
            atomic.write_json(out, stored)
    choice = {k: v for k, v in stored.items() if k != "stamp"}
    atomic.write_json(Path(bundle_dir) / "bundle.json", {**read_meta(bundle_dir), "sampling": choice})
    return choice
