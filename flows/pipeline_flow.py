"""The main job: the data flow, then the train flow, then the sign-off report and publishing.

One MLflow `pipeline` run is the parent of everything this run did (data, train, and under
train the codec, s2s and register runs), so a reviewer opens one tree. `make pipeline` runs this
flow in the smoke profile; the `pipeline` deployment runs it from the Prefect UI and weekly.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.evaluation.model_quality import quality_markdown
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from core.config import Params, load_params
from flows.one_writer import holds_writer_slot
from flows.workspace import exclusive
from flows.data_flow import data_flow
from flows.train_flow import train_flow, with_thresholds
from tasks.release import flow_runs, signoff


@task(name="log-data-run", cache_policy=NO_CACHE)
def log_data_task(params: Params, summary: dict[str, Any], parent_run_id: str) -> str:
    return flow_runs.log_data_run(params, summary, parent_run_id)


@task(name="signoff-report", cache_policy=NO_CACHE)
def signoff_task(params: Params, version: str) -> str:
    """The reviewer's report for the new version (MLflow artifact, Prefect artifact, local file)."""
    _, path = signoff.publish_report(params, version, prefect=True)
    return str(path)


@task(name="publish", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def publish_task(params: Params, bundle_dir: Path, run_id: str) -> dict[str, Any]:
    """Upload to the Hub with a token, else write the bundle locally and say so."""
    from tasks.release.publish import publish_bundle

    report = asdict(publish_bundle(bundle_dir, params.publish, params.path(params.publish.out_dir)))
    flow_runs.set_tags(params, run_id, {"publish.mode": report.get("mode", "?")})
    return report


@flow(name="pipeline", log_prints=True)
@holds_writer_slot
@exclusive("pipeline flow")
def pipeline_flow(profile: str = "smoke", sources_file: str | None = None, overrides: dict[str, Any] | None = None,
                  thresholds: dict[str, Any] | None = None, publish: bool = True) -> dict[str, Any]:
    """Corpus -> candidate -> gates -> registry -> sign-off report -> Hugging Face."""
    started = time.monotonic()
    logger = get_run_logger()
    params = load_params(profile, with_thresholds(overrides, thresholds))
    run_id = flow_runs.open_run(params, "pipeline")
    try:
        corpus = data_flow(profile=profile, sources_file=sources_file, overrides=overrides)
        log_data_task(params, corpus, run_id)
        trained = train_flow(profile=profile, overrides=overrides, thresholds=thresholds, parent_run_id=run_id)
        report_path = signoff_task(params, trained["version"])
        published = None
        if publish and params.publish.enabled:
            if "champion" in trained["aliases"]:
                published = publish_task(params, Path(trained["bundle"]), run_id)
            else:  # only a signed-off model leaves the building
                published = {"mode": "skipped", "message": f"version {trained['version']} is not champion yet: "
                             "publish it after sign-off with `s2s publish`"}
    except BaseException as exc:
        flow_runs.set_tags(params, run_id, {"failure": str(exc)[:4000]})
        flow_runs.close_run(params, run_id, "FAILED")
        raise
    flow_runs.set_tags(params, run_id, {"registered_model": trained["model"],
                                        "registered_version": trained["version"]})
    flow_runs.close_run(params, run_id)
    seconds = round(time.monotonic() - started, 1)
    links = {**trained["links"], **flow_runs.ui_links(params, str(flow_run.id) if flow_run.id else None, None),
             "signoff_report": report_path}
    result = {"seconds": seconds, "run_id": run_id, "corpus": corpus, "train": trained, "publish": published,
              "links": links}
    if published:
        logger.info("publish: %s", published.get("message", published.get("mode")))
    create_markdown_artifact(key="pipeline-summary", markdown=summary_markdown(result),
                             description="What the pipeline run produced and where to look")
    return result


def summary_markdown(result: dict[str, Any]) -> str:
    trained, corpus = result["train"], result["corpus"]
    lines = [f"# Pipeline run ({result['seconds']} s)", "",
             f"- corpus: {corpus['segments_kept']} segments ({corpus['kept_hours']:.3f} h), {corpus['pairs']} pairs, "
             f"hash `{corpus.get('corpus_hash')}`",
             f"- model: `{trained['model']}` version {trained['version']} ({', '.join(trained['aliases'])})",
             "- gates: " + ", ".join(f"{n} {'passed' if g['passed'] else 'FAILED'}" for n, g in trained["gates"].items()),
             f"- publish: {(result['publish'] or {}).get('message', 'skipped')}", "",
             *(f"- {k}: {v}" for k, v in result["links"].items())]
    if trained.get("quality"):
        lines += ["", "## Quality", "", quality_markdown(trained["quality"])]
    return "\n".join(lines) + "\n"
