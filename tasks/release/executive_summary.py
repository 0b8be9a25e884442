"""The one-page summary for the business head (`s2s signoff summary`): what the model does, its
figures against the checklist's targets, what it costs to train and to serve, the risks the
figures show, and the approvals still missing. Built only from what was measured for the version
(the same sources as the sign-off report), so it can be regenerated at any time and never claims
more than the report does.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from core import atomic
from core.config import Params
from tasks.release.demo_recording import ARTIFACT_PATH, demo_dir, recorded_demo
from tasks.release.inference_cost import Capacity, inference_cost, measured_capacity
from tasks.release.registry import CHAMPION, mlflow_client, version_info
from tasks.release.signoff import CHECKLIST, _metric, _verdict, approvals, resolve_version


def _targets(info: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(item, target, measured, verdict) of every checklist item that has a target."""
    rows = []
    for label, dotted, op, target, _ in CHECKLIST:
        if target is None or dotted is None:
            continue
        value = _metric(info["evaluation"], info["tags"], dotted)
        rows.append((label, f"{op} {target:g}", "—" if value is None else f"{value:.4g}", _verdict(value, op, target)))
    return rows


def risks(rows: list[tuple[str, str, str, str]], capacity: Capacity, target_p95_ms: float,
          quality: dict[str, Any] | None) -> list[str]:
    """What stands between this version and production, from the figures themselves."""
    found = [f"**{label}** is missed: {measured} against a target of {target}."
             for label, target, measured, verdict in rows if verdict.startswith("❌")]
    missing = [label for label, _, _, verdict in rows if "not measured" in verdict]
    if missing:
        found.append(f"Not measured yet, so not shown to work: {', '.join(missing)}.")
    at_load = capacity.first_audio_ms.get(100, {}).get("p95")
    if at_load is not None and at_load >= target_p95_ms:
        found.append(f"At 100 concurrent sessions the p95 first audio is {at_load:.0f} ms (goal < "
                     f"{target_p95_ms:g} ms): one server carries {capacity.sessions} sessions, so 100 need more "
                     f"servers (see Cost).")
    corpus = ((quality or {}).get("sets", {}).get("corpus", {}) or {}).get("dnsmos_p808")
    if corpus is not None:
        found.append(f"The training corpus is synthetic espeak-ng speech (its own DNSMOS P.808 is {corpus:.2f}): "
                     "no model trained on it can reach the checklist's MOS 4.0; real recordings are needed.")
    return found or ["None found in the measured figures."]


def demo_section(record: dict[str, Any] | None, folder: str) -> list[str]:
    """Links to the version's demo recording (`s2s signoff demo`), `folder` relative to the page."""
    if record is None:
        return []
    reply = record.get("reply_end") or {}
    seconds = (reply.get("metrics") or {}).get("reply_seconds")
    first_audio = (record.get("page") or {}).get("first_audio_ms")
    text = (record.get("page") or {}).get("reply_text") or "-"
    run = (record.get("mlflow") or {}).get("run_id")
    return ["", "## Demo", "",
            f"One turn on the demo page, recorded {record.get('recorded_at', '?')} by `s2s signoff demo` "
            f"(voice {record['voice']['speaker']} / {record['voice']['emotion']}, a test-split user turn): "
            f"[the page (video)]({folder}/demo.webm), [the reply as the page received it]({folder}/reply.wav) "
            f"({'?' if seconds is None else f'{seconds:.2f} s'}, first audio "
            f"{'?' if first_audio is None else f'{first_audio:.0f} ms'} on the page), "
            f"[what was measured]({folder}/demo.json). The reply's text on the page: {text}"
            + (f"; MLflow artifacts `{ARTIFACT_PATH}/` of run `{run}`." if run else ".")]


def render_summary(info: dict[str, Any], params: Params, capacity: Capacity, today: str | None = None,
                   demo: list[str] | None = None) -> str:
    tags, evaluation = info["tags"], info["evaluation"]
    name, version = info["name"], info["version"]
    rows = _targets(info)
    meets = sum(1 for r in rows if r[3].startswith("✅"))
    misses = sum(1 for r in rows if r[3].startswith("❌"))
    unmeasured = len(rows) - meets - misses
    cost = inference_cost(params, capacity)
    training = _metric(evaluation, tags, "cost.total_usd")
    done = approvals(tags)
    missing = [role for role in params.registry.required_roles if role not in done]
    today = today or dt.date.today().isoformat()
    lines = [f"# Executive summary: {name} version {version}", "",
             f"Written by `s2s signoff summary` on {today} from the figures measured for this version "
             f"(aliases: {', '.join(info['aliases']) or 'none'}; profile {tags.get('profile', '?')}). The full "
             f"evidence is its sign-off report (`s2s signoff report --version {version}`).", "",
             "## What it does", "",
             "A Telugu voice that answers speech with speech: the user talks, and the reply streams back in 20 ms "
             "frames while it is generated. The caller picks one of 4 voices and 9 emotions (how many of them "
             "actually work is measured below). It runs on ordinary CPUs "
             "(a GPU is optional), behind a WebSocket server with a demo page, and every version is trained, "
             "gated and registered by the pipeline before anyone can serve it.", "",
             "## Figures against the targets", "",
             f"{meets} of {len(rows)} checklist targets met, {misses} missed, {unmeasured} not measured.", "",
             "| item | target | measured | verdict |", "|---|---|---|---|",
             *[f"| {label} | {target} | {measured} | {verdict} |" for label, target, measured, verdict in rows], "",
             "## Cost", ""]
    lines.append(f"- Training this version: {'not measured' if training is None else f'${training:.2f}'}.")
    if cost is None:
        lines.append("- Serving: not computed (no measured capacity met the latency target).")
    else:
        lines += [f"- Serving {cost['load_sessions']} conversations around the clock: {cost['servers']} servers of "
                  f"{cost['cores_per_server']} cores, ${cost['usd_per_hour']:.2f} per hour, "
                  f"${cost['usd_per_month']:.0f} per month; ${cost['usd_per_user_hour_full']:.4f} per user-hour "
                  f"with servers fully used.",
                  f"- Capacity source: {capacity.source}; price ${params.inference_cost.core_hour_usd:g} per core-hour "
                  f"(params.yaml, an assumption to replace with the provider's price)."]
    lines += ["", "## Risks", "",
              *[f"- {r}" for r in risks(rows, capacity, params.inference_cost.target_p95_ms, evaluation.get("quality"))],
              "", "## Approvals", ""]
    if missing:
        lines.append(f"Still missing: {', '.join(missing)} "
                     f"(`s2s signoff approve --role ROLE --name NAME --version {version}`).")
    else:
        lines.append("Every required role approved.")
    if tags.get("promoted"):
        lines.append(f"It became `{CHAMPION}` by: {tags['promoted']}.")
    lines += [f"- {role}: {entry['name']} ({entry['at']})" for role, entry in done.items()]
    lines += demo or []
    return "\n".join(lines) + "\n"


def write_summary(params: Params, version: str | None = None, out: Path | None = None) -> tuple[str, Path]:
    """The champion's summary (or `version`'s): under artifacts/signoff, as an MLflow artifact of
    the version's run, and at `out` when given. Returns (markdown, path written)."""
    client = mlflow_client(params)
    name = params.registry.model_name
    if version is None:
        try:
            version = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except Exception:  # no champion yet: the candidate's summary
            version = resolve_version(client, name, None)
    info = version_info(client, name, resolve_version(client, name, version))
    capacity = measured_capacity(params)
    demo = recorded_demo(params, name, info["version"])
    # the recording sits in signoff/demo/ beside the summary, in artifacts/ as in MLflow
    markdown = render_summary(info, params, capacity, demo=demo_section(demo, "demo"))
    path = params.path(params.paths.artifacts) / "signoff" / f"{name}-v{info['version']}-summary.md"
    atomic.write_text(path, markdown)
    client.log_text(info["run_id"], markdown, f"signoff/executive-summary-v{info['version']}.md")
    if out is not None:
        folder = os.path.relpath(demo_dir(params), Path(out).resolve().parent)
        markdown = render_summary(info, params, capacity, demo=demo_section(demo, folder))
        atomic.write_text(out, markdown)
        path = out
    return markdown, path
