"""The time-quality curve of a profile's last training: where more minutes stop paying.

Training runs record points at their `curve_steps` (tasks/training/curve.py): the codec's STOI
and PESQ-wb on the test split and the unseen voices, the S2S model's validation cross-entropy.
Cross-entropy does not say whether replies are intelligible or obey the controls, so the S2S
snapshots can also be scored here the way the sign-off scores a model (fewer reply inputs), each
as a bundle of the final codec and that snapshot. Results go to artifacts/curve-<profile>.json|md.
"""

from __future__ import annotations

from typing import Any

from core import atomic
from core.config import Params
from serving.bundle import bundle_sha, export_bundle, load_bundle_dir
from tasks.evaluation.model_quality import evaluate_quality
from tasks.training.curve import read_curve, snapshot_path

CODEC_COLUMNS = ("stoi", "pesq_wb", "unseen_stoi", "unseen_pesq_wb")
S2S_COLUMNS = ("cross_entropy", "text_cross_entropy")
REPLY_COLUMNS = ("intelligibility_cer", "cer", "speakers_working", "speaker_control", "emotions_working",
                 "emotion_control", "dnsmos_p808")


def score_s2s_snapshots(params: Params, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each S2S point with the quality figures of its replies (final codec + that snapshot)."""
    codec_checkpoint = params.path(params.codec_train.out_dir) / "last.pt"
    s2s_dir = params.path(params.s2s_train.out_dir)
    scored = []
    for point in points:
        snapshot = snapshot_path(s2s_dir, point["step"])
        if not snapshot.is_file():
            scored.append(point)
            continue
        bundle_dir = export_bundle(codec_checkpoint, snapshot, s2s_dir / "curve-bundles" / f"step{point['step']:06d}",
                                   {"model_name": "curve", "profile": params.profile, "step": point["step"]})
        report = evaluate_quality(load_bundle_dir(bundle_dir), params, bundle_sha(bundle_dir), use_mlflow=False)
        replies = report["sets"]["replies"]
        scored.append({**point, **{f"reply_{k}": replies[k] for k in REPLY_COLUMNS if k in replies}})
    return scored


def training_curve(params: Params, score_replies: bool = False) -> dict[str, Any]:
    """The codec and S2S points of the profile's last runs (S2S replies scored when asked);
    written to artifacts/curve-<profile>.json and .md."""
    codec = read_curve(params.path(params.codec_train.out_dir))
    s2s = read_curve(params.path(params.s2s_train.out_dir))
    if score_replies:
        s2s = score_s2s_snapshots(params, s2s)
    report = {"profile": params.profile, "codec": codec, "s2s": s2s}
    out = params.path(params.paths.artifacts) / f"curve-{params.profile}"
    atomic.write_json(out.with_suffix(".json"), report)
    atomic.write_text(out.with_suffix(".md"), curve_markdown(report))
    return report


def _table(points: list[dict[str, Any]], columns: tuple[str, ...]) -> list[str]:
    shown = [c for c in columns if any(c in p for p in points)]
    lines = ["| step | training minutes | " + " | ".join(shown) + " |", "|---" * (len(shown) + 2) + "|"]
    for p in points:
        cells = [f"{p[c]:.3f}" if isinstance(p.get(c), (int, float)) else "-" for c in shown]
        lines.append(f"| {p['step']} | {p['train_minutes']:.1f} | " + " | ".join(cells) + " |")
    return lines


def curve_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Time-quality curve, profile `{report['profile']}`", ""]
    for name, columns in (("codec", CODEC_COLUMNS), ("s2s", S2S_COLUMNS + tuple(f"reply_{c}" for c in REPLY_COLUMNS))):
        lines += [f"## {name}", ""]
        lines += _table(report[name], columns) if report[name] else ["(no points: set curve_steps and train)"]
        lines.append("")
    return "\n".join(lines)
