"""Sign-off: the report a reviewer reads, and approvals that promote a version to champion.

The report puts each technical target of the checklist beside the figure measured for this
version, the profile's gate and a verdict; a target nothing measures yet says so instead of being
ticked. Approvals are tags on the model version (`signoff.<role>` = who, `signoff.<role>.at` =
when); once every role that params.yaml requires has approved, the version becomes `champion`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from core import atomic
from core.config import Params
from tasks.evaluation.model_quality import draws_sentence, per_label_precision, per_label_recall, working_labels
from tasks.release.comparison import comparison_section
from tasks.release.inference_cost import cost_section, inference_cost, measured_capacity
from tasks.release.registry import CHAMPION, mlflow_client, promote, version_info

ROLES = ("technical_lead", "project_manager", "business_head")

# (checklist item, evaluation metric "stage.key", comparison, checklist target, remark)
CHECKLIST: list[tuple[str, str | None, str, float | None, str]] = [
    ("Codec SNR > 30 dB", "codec.snr_db", ">=", 30.0,
     "beyond any codec at a few kbps (Opus at 12 kbps: ~9 dB here); the gate weighs STOI, PESQ, mel"),
    ("Codec STOI", "codec.stoi", ">=", None, "no checklist target; gated per profile"),
    ("Codec PESQ (wide band)", "codec.pesq_wb", ">=", None, "no checklist target; gated per profile"),
    ("S2S cross-entropy < 2.0", "s2s.cross_entropy", "<=", 2.0, "validation split, nats"),
    ("S2S perplexity < 10", "s2s.perplexity", "<=", 10.0, "validation split"),
    ("Latency mean < 150 ms", "latency.first_audio_mean_ms", "<=", 150.0, "first audio, serving code path"),
    ("Latency std < 20 ms", "latency.first_audio_std_ms", "<=", 20.0, "first audio, serving code path"),
    ("Capacity: 100 sessions on 2 cores", "latency.capacity_sessions_per_core", ">=", 50.0,
     "sessions per core within p95 < 300 ms and no playback gap (s2s loadtest, docs/benchmarks.md)"),
    ("Codec training cost ~$32", "cost.codec_usd", "<=", 32.0, "device hours x rate in params.yaml"),
    ("S2S training cost ~$96", "cost.s2s_usd", "<=", 96.0, "device hours x rate in params.yaml"),
    ("Total training cost $130", "cost.total_usd", "<=", 130.0, ""),
    ("MOS > 4.0", "quality.replies.dnsmos_p808", ">=", 4.0,
     "DNSMOS P.808 of generated replies; the corpus's own audio is the ceiling (see Quality)"),
    ("Telugu accuracy > 90%", "quality.replies.intelligibility", ">=", 0.9,
     "1 - CER of replies against the text the model says it spoke (a model with a text stream), by the "
     "pipeline's recognizer"),
    ("Reply appropriateness", "quality.replies.telugu_accuracy", ">=", None,
     "1 - CER of replies against the corpus's own reply text: the expected answer, not only clear speech"),
    ("Emotion recognition > 85%", "quality.replies.emotion_control", ">=", 0.85,
     "replies recognised as the requested emotion by the pipeline's classifier"),
    ("Emotion control: 9 working", "quality.replies.emotions_working", ">=", 9, "see Quality"),
    ("Speaker control: 4 working", "quality.replies.speakers_working", ">=", 4, "see Quality"),
]

# (figure, key in corpus/codec sets, key in the replies set, format) of the Quality section
QUALITY_ROWS: list[tuple[str, str, str, str]] = [
    ("DNSMOS P.808", "dnsmos_p808", "dnsmos_p808", "{:.2f}"),
    ("DNSMOS OVRL", "dnsmos_ovrl", "dnsmos_ovrl", "{:.2f}"),
    ("DistillMOS", "distillmos", "distillmos", "{:.2f}"),
    ("Telugu accuracy (1 - CER; replies: against their own text)", "telugu_accuracy", "intelligibility", "{:.1%}"),
    ("reply appropriateness (1 - CER against the corpus reply)", "appropriateness", "telugu_accuracy", "{:.1%}"),
    ("emotion recognised / control", "emotion_accuracy", "emotion_control", "{:.1%}"),
    ("speaker recognised / control", "speaker_accuracy", "speaker_control", "{:.1%}"),
]


def _metric(evaluation: dict[str, Any], tags: dict[str, str], dotted: str) -> float | None:
    stage, key = dotted.split(".", 1)
    value = evaluation.get("metrics", {}).get(stage, {}).get(key)
    if value is None and dotted in tags:
        value = tags[dotted]
    return None if value is None else float(value)


def _verdict(value: float | None, op: str, target: float | None) -> str:
    if value is None:
        return "— not measured"
    if target is None:
        return "see gate"
    ok = value >= target if op == ">=" else value <= target
    return "✅ meets" if ok else "❌ misses"


def approvals(tags: dict[str, str]) -> dict[str, dict[str, str]]:
    return {role: {"name": tags[f"signoff.{role}"], "at": tags.get(f"signoff.{role}.at", "")}
            for role in ROLES if f"signoff.{role}" in tags}


def render_report(info: dict[str, Any], required_roles: list[str], tracking: str = "",
                  serving_sections: list[str] | None = None) -> str:
    """The markdown report of one model version, readable without running anything;
    `serving_sections` (inference cost and the comparison, from serving_sections()) follow the
    training cost."""
    tags, evaluation = info["tags"], info["evaluation"]
    name, version = info["name"], info["version"]
    lines = [f"# Sign-off: {name} version {version}", "",
             f"- aliases: {', '.join(info['aliases']) or 'none'}",
             f"- profile: {tags.get('profile', '?')}; git commit: `{tags.get('git_commit', '?')}`",
             f"- corpus (DVC hash): `{tags.get('corpus_hash', '?')}`",
             f"- gates: {'all passed' if tags.get('gates_passed') == 'true' else 'NOT all passed'}",
             f"- MLflow: run `{info['run_id']}`" + (f" in {tracking}" if tracking else ""), ""]
    corpus = evaluation.get("corpus", {})
    if corpus:
        lines += ["## Data", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in corpus.items()] + [""]
    lines += ["## Checklist targets", "",
              "| item | checklist target | measured | verdict | remark |", "|---|---|---|---|---|"]
    for label, dotted, op, target, remark in CHECKLIST:
        value = _metric(evaluation, tags, dotted) if dotted else None
        shown = "—" if value is None else f"{value:.4g}"
        target_text = "—" if target is None else f"{op} {target:g}"
        lines.append(f"| {label} | {target_text} | {shown} | {_verdict(value, op, target)} | {remark} |")
    lines += ["", "## Gates (profile thresholds)", "", "| gate | metric | value | rule | passed | note |",
              "|---|---|---|---|---|---|"]
    for gate in evaluation.get("gates", {}).values():
        for check in gate["checks"]:
            value = "not measured" if check["value"] is None else f"{check['value']:.4g}"
            lines.append(f"| {gate['name']} | {check['metric']} | {value} | {check['op']} {check['threshold']:.4g} | "
                         f"{'yes' if check['passed'] else '**no**'} | {check.get('note', '')} |")
    lines += quality_section(evaluation.get("quality"), evaluation.get("runs", {}))
    metrics = evaluation.get("metrics", {})
    if metrics.get("codec_baselines"):
        rows = {"TeluCodec": metrics.get("codec", {}), **metrics["codec_baselines"]}
        columns = ("stoi", "pesq_wb", "mel_distance", "snr_db", "delay_ms")
        for title, prefix in (("test split", ""), ("unseen voices", "unseen_")):
            if not any(f"{prefix}stoi" in row for row in rows.values()):
                continue
            lines += ["", f"## Codec against reference codecs on the same audio ({title})", "",
                      "| codec | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            for label, row in rows.items():
                lines.append(f"| {label} | " + " | ".join(
                    "-" if row.get(prefix + k) is None else f"{row[prefix + k]:.3f}" for k in columns) + " |")
    if metrics.get("cost"):
        lines += ["", "## Cost", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics["cost"].items()]
    lines += serving_sections or []
    done = approvals(tags)
    lines += ["", "## Approvals", "", f"Required for `{CHAMPION}`: {', '.join(required_roles) or 'none'}", "",
              "| role | approved by | at |", "|---|---|---|"]
    for role in ROLES:
        entry = done.get(role)
        lines.append(f"| {role} | {entry['name'] if entry else 'pending'} | {entry['at'] if entry else ''} |")
    lines += promotion_section(tags)
    if tags.get("promoted"):
        lines += ["", f"Promoted to `{CHAMPION}`: {tags['promoted']}"]
    return "\n".join(lines) + "\n"


def serving_sections(params: Params, info: dict[str, Any]) -> list[str]:
    """Inference cost at the measured capacity, and the comparison with the published peers."""
    tags, evaluation = info["tags"], info["evaluation"]
    capacity = measured_capacity(params)
    training = evaluation.get("metrics", {}).get("cost")
    if training is None and "cost.total_usd" in tags:
        training = {"total_usd": float(tags["cost.total_usd"])}
    return [*cost_section(params, capacity, training),
            *comparison_section(lambda dotted: _metric(evaluation, tags, dotted), evaluation.get("quality"),
                                capacity, inference_cost(params, capacity))]


def promotion_headline(decision: dict[str, Any]) -> str:
    verdicts = {row["verdict"] for row in decision["rows"]}
    return "Not worse" if decision["promote"] else "Worse" if "worse" in verdicts else "Not comparable"


def promotion_section(tags: dict[str, str]) -> list[str]:
    """The candidate against the champion of its day (tasks/release/promotion.py), when recorded."""
    if not tags.get("promotion"):
        return []
    decision = json.loads(tags["promotion"])
    if decision.get("champion_version") is None:
        return ["", "## Against the champion", "", "There was no champion when this version was registered."]
    lines = ["", f"## Against the champion (version {decision['champion_version']})", "",
             f"{promotion_headline(decision)}: {decision['reason']}.", "",
             "| figure | this version | champion | verdict |", "|---|---|---|---|"]
    for row in decision["rows"]:
        cells = ["-" if row[k] is None else f"{row[k]:.4g}" for k in ("challenger", "champion")]
        lines.append(f"| {row['metric']} | {cells[0]} | {cells[1]} | {row['verdict']} |")
    return lines


def _cell(figures: dict[str, Any], key: str, fmt: str) -> str:
    value = figures.get(key)
    return "—" if value is None else fmt.format(value)


def judges_heldout_line(quality: dict[str, Any]) -> list[str]:
    """How well the classifiers judge all 36 controls: their balanced accuracy on held-out renderings
    (val sentences spoken by espeak-ng in every control; tasks/evaluation/judge_renderings.py)."""
    training = quality.get("evaluators", {}).get("training", {})
    shown = [f"the {kind} judge {training[kind]['metrics']['balanced_accuracy_rendered']:.0%}"
             for kind in ("emotion", "speaker")
             if "balanced_accuracy_rendered" in training.get(kind, {}).get("metrics", {})]
    if not shown:
        return []
    return ["", "On held-out renderings (val sentences spoken in all 36 controls, never trained on), "
                f"balanced over the labels: {' and '.join(shown)}."]


def quality_section(quality: dict[str, Any] | None, runs: dict[str, Any]) -> list[str]:
    """The quality evaluators' figures: each beside the ceiling measured on the corpus itself,
    the codec round trip, the per-label control verdicts, and the MLflow runs behind them."""
    if not quality:
        return ["", "## Quality", "", "Not measured for this version (no quality evaluation recorded)."]
    sets = quality["sets"]
    corpus, roundtrip, replies, rendered = (sets.get(k, {}) for k in ("corpus", "codec_roundtrip", "replies", "rendered"))
    lines = ["", "## Quality (measured on generated replies, judged against the corpus itself)", "",
             "| figure | generated replies | ceiling: corpus audio | ceiling: renderings, every control | "
             "codec round trip |", "|---|---|---|---|---|"]
    for label, key, reply_key, fmt in QUALITY_ROWS:
        own = "—" if key == "appropriateness" else _cell(rendered, reply_key, fmt)
        lines.append(f"| {label} | {_cell(replies, reply_key, fmt)} | {_cell(corpus, key, fmt)} | {own} | "
                     f"{_cell(roundtrip, key, fmt)} |")
    lines += ["", "The corpus is espeak-ng speech: its own MOS is the most a model trained on it can reach, "
              "so a model is judged by how close it comes to that ceiling, and the evaluators' accuracy on "
              "held-out corpus audio bounds what they can credit a model with. The corpus's test split holds "
              "2 of the 9 emotions; the renderings (the same replies' sentences spoken by espeak-ng in every "
              "control asked for) show what the judges credit on all 9."]
    lines += judges_heldout_line(quality)
    if draws := draws_sentence(quality):
        lines += ["", draws]
    needed = quality.get("working_share", 0.5)
    for kind in ("emotion", "speaker"):
        matrix = quality.get("confusion", {}).get("replies", {}).get(kind)
        labels = quality.get("labels", {}).get(kind, [])
        if not matrix:
            continue
        recall, precision = per_label_recall(matrix, tuple(labels)), per_label_precision(matrix, tuple(labels))
        ceiling = quality.get("confusion", {}).get("rendered", {}).get(kind)
        works_there = set(working_labels(ceiling, tuple(labels), needed)) if ceiling else None
        lines += ["", f"| {kind} | replies asking for it | recognised as it (recall) | asked for it, of those "
                      f"recognised as it (precision) | working (both >= {needed:.0%}) | ceiling: working in the "
                      "renderings |", "|---|---|---|---|---|---|"]
        for label, row in zip(labels, matrix):
            shown = [("—" if value is None else f"{value:.0%}") for value in (recall.get(label), precision.get(label))]
            verdict = ("— not measured" if label not in recall else
                       "✅ yes" if recall[label] >= needed and precision.get(label, 0.0) >= needed else "❌ no")
            there = "—" if works_there is None else "yes" if label in works_there else "no"
            lines.append(f"| {label} | {sum(row)} | {shown[0]} | {shown[1]} | {verdict} | {there} |")
    run_names = {"quality": "quality evaluation", "asr": "recognizer training", "emotion": "emotion classifier",
                 "speaker": "speaker classifier"}
    runs = {**quality.get("evaluators", {}).get("runs", {}), **runs}
    shown = [f"- {label}: `{runs[key]}`" for key, label in run_names.items() if runs.get(key)]
    if shown:
        lines += ["", "MLflow runs:", "", *shown]
    return lines


def artifact_key(name: str, version: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for a version's report."""
    return re.sub(r"[^a-z0-9-]+", "-", f"signoff-{name}-v{version}".lower())


def resolve_version(client: Any, name: str, version: str | None) -> str:
    """`version` as given, else the challenger's, else the champion's."""
    if version:
        return str(client.get_model_version(name, version).version)
    for alias in ("challenger", CHAMPION):
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except Exception:  # alias not set
            continue
    raise LookupError(f"{name} has no challenger or champion version: run the pipeline first")


def publish_report(params: Params, version: str | None = None, prefect: bool = True) -> tuple[str, Path]:
    """Render a version's report; write it under artifacts/signoff, log it to the version's MLflow
    run, and (with `prefect`) as a Prefect markdown artifact. Returns (markdown, local path)."""
    client = mlflow_client(params)
    name = params.registry.model_name
    version = resolve_version(client, name, version)
    info = version_info(client, name, version)
    markdown = render_report(info, params.registry.required_roles, client.tracking_uri, serving_sections(params, info))
    path = params.path(params.paths.artifacts) / "signoff" / f"{name}-v{version}.md"
    atomic.write_text(path, markdown)
    client.log_text(info["run_id"], markdown, f"signoff/report-v{version}.md")
    if prefect:
        report_artifact(artifact_key(name, version), markdown, f"Sign-off report of {name} version {version}")
    return markdown, path


def report_artifact(key: str, markdown: str, description: str) -> None:
    """The report as a Prefect markdown artifact: of the current run inside a flow, else of a
    small `signoff-report` flow run (Prefect is dropping artifacts that belong to no run)."""
    from prefect import flow
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() or TaskRunContext.get():
        create_markdown_artifact(key=key, markdown=markdown, description=description)
        return

    @flow(name="signoff-report", log_prints=True)
    def signoff_report() -> None:
        create_markdown_artifact(key=key, markdown=markdown, description=description)

    signoff_report()


def approve(params: Params, role: str, reviewer: str, version: str | None = None) -> dict[str, Any]:
    """Record `reviewer`'s approval in `role`; promote to champion once every required role has
    approved. Refuses an unknown role, an empty name and a version whose gates failed."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if not reviewer.strip():
        raise ValueError("the reviewer's name is empty: pass --name")
    client = mlflow_client(params)
    name = params.registry.model_name
    version = resolve_version(client, name, version)
    tags = client.get_model_version(name, version).tags
    if tags.get("gates_passed") != "true":
        raise PermissionError(f"{name} version {version} did not pass its gates: it cannot be signed off")
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    client.set_model_version_tag(name, version, f"signoff.{role}", reviewer.strip())
    client.set_model_version_tag(name, version, f"signoff.{role}.at", now)
    done = approvals(client.get_model_version(name, version).tags)
    missing = [r for r in params.registry.required_roles if r not in done]
    promoted = False
    if not missing:
        signers = ", ".join(f"{role}={entry['name']}" for role, entry in done.items())
        promote(client, name, version, f"signed off by {signers}")
        promoted = True
    return {"name": name, "version": version, "approved": sorted(done), "missing": missing, "promoted": promoted}
