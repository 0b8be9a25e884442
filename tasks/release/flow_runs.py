"""MLflow runs of the flows themselves: the pipeline run, the train run under it, the data run.

Stage runs (codec, s2s, register) nest under the flow's run through the `mlflow.parentRunId`
tag, so the MLflow UI shows one tree per pipeline run. Everything here goes through an explicit
run id with MlflowClient rather than MLflow's thread-local "active run", because Prefect may run
tasks on other threads than the flow.
"""

from __future__ import annotations

import os
from typing import Any

from core.config import Params
from tasks.evaluation.gates import GateResult
from tasks.release.registry import mlflow_client
from tasks.training.provenance import corpus_hash, git_commit
from tasks.training.tracker import use_experiment


def flow_run_tags(params: Params, stage: str) -> dict[str, str]:
    """Tags every flow run carries: stage, profile, corpus and code version, Prefect flow run."""
    tags = {"stage": stage, "profile": params.profile, "git_commit": git_commit(params.root),
            "corpus_hash": corpus_hash(params.root, params.path(params.paths.data))}
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            tags["prefect_flow_run_id"] = str(flow_run.id)
    except Exception:  # outside Prefect
        pass
    return tags


def open_run(params: Params, name: str, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None) -> str:
    """Create a run (nested under `parent_run_id` when given) and return its id."""
    experiment_id = use_experiment(params.root, params.mlflow.tracking_uri, params.mlflow.experiment)
    client = mlflow_client(params)
    all_tags = {**flow_run_tags(params, name), **(tags or {}), "mlflow.runName": name,
                **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


def close_run(params: Params, run_id: str, status: str = "FINISHED") -> None:
    mlflow_client(params).set_terminated(run_id, status=status)


def log_gate(params: Params, run_id: str, gate: GateResult) -> None:
    """A gate's verdict on a run: a tag (passed/failed), its reason, a 0/1 metric per check."""
    client = mlflow_client(params)
    client.set_tag(run_id, f"gate.{gate.name}", "passed" if gate.passed else "failed")
    if not gate.passed:
        client.set_tag(run_id, f"gate.{gate.name}.reason", gate.reason[:4000])
    for check in gate.checks:
        if check.value is not None:
            client.log_metric(run_id, f"gate.{gate.name}.{check.metric}", float(check.value))


def reject_run(params: Params, run_id: str, gate: GateResult) -> None:
    """Mark a flow run as refused by `gate` (tags a reviewer can filter on) and end it FAILED."""
    client = mlflow_client(params)
    client.set_tag(run_id, "rejected_by", gate.name)
    client.set_tag(run_id, "rejection_reason", gate.reason[:4000])
    client.set_terminated(run_id, status="FAILED")


def set_tags(params: Params, run_id: str, tags: dict[str, str]) -> None:
    client = mlflow_client(params)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def corpus_facts(params: Params) -> dict[str, Any]:
    """What a reviewer wants to know of the training data: its version and size."""
    import json

    data = params.path(params.paths.data)
    facts: dict[str, Any] = {"hash": corpus_hash(params.root, data)}
    summary = data / "reports" / "summary.json"
    if summary.is_file():
        stats = json.loads(summary.read_text())
        facts |= {k: stats[k] for k in ("kept_hours", "segments_kept", "segments_quarantined", "pairs", "speakers",
                                        "emotions") if k in stats}
    return facts


def log_metrics(params: Params, run_id: str, metrics: dict[str, Any], prefix: str = "") -> None:
    client = mlflow_client(params)
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run_id, f"{prefix}{key}", float(value))


def log_data_run(params: Params, summary: dict[str, Any], parent_run_id: str) -> str:
    """The data flow's outcome as a child run: corpus size, quarantine by reason, the GX report."""
    run_id = open_run(params, "data", parent_run_id, {"corpus_hash": str(summary.get("corpus_hash"))})
    client = mlflow_client(params)
    log_metrics(params, run_id, {"hours_in": summary["hours_in"], "kept_hours": summary["kept_hours"],
                                 "segments_kept": summary["segments_kept"], "pairs": summary["pairs"],
                                 "segments_quarantined": summary["segments_quarantined"],
                                 "recordings": summary["recordings"]})
    log_metrics(params, run_id, summary.get("quarantine_reasons", {}), "quarantined.")
    report = params.path(params.paths.data) / "reports" / "validation.json"
    if report.is_file():
        client.log_artifact(run_id, str(report), "reports")
    client.set_terminated(run_id)
    return run_id


def ui_links(params: Params, flow_run_id: str | None, version: str | None) -> dict[str, str]:
    """Where to look once `make ui` serves both UIs on loopback."""
    prefect_ui = os.environ.get("S2S_PREFECT_UI", "http://127.0.0.1:4200")
    mlflow_ui = os.environ.get("S2S_MLFLOW_UI", "http://127.0.0.1:5000")
    links = {"mlflow_store": mlflow_client(params).tracking_uri}
    if flow_run_id:
        links["prefect_run"] = f"{prefect_ui}/runs/flow-run/{flow_run_id}"
    if version:
        links["mlflow_model"] = f"{mlflow_ui}/#/models/{params.registry.model_name}/versions/{version}"
    return links
