"""The train flow: codec -> codec gate -> S2S (tokenizing first; then guidance distilled into it when
s2s_distill.steps > 0) -> S2S gate -> bundle ->
quality evaluation -> quality gate -> latency gate -> (the champion evaluated again when other judges
measured it) -> register.

The gate sequence is tasks/evaluation/gates.py's gate_candidate (the one `s2s gates` runs too);
the flow runs its steps as Prefect tasks and records each gate in MLflow and Prefect.
With params.yaml `distributed` above 1 node x 1 process, the two trainings run under torchrun
(tasks/training/launch.py) instead of in the flow's process; other nodes join with `s2s train node`.

A gate that fails ends the flow there: the MLflow train run is tagged with the gate and its
reason and ends FAILED, the Prefect run fails with the same message, and nothing is registered.
Re-running with unchanged corpus, settings and code skips both trainings (their stamps match,
see tasks/training/stage_cache.py) and re-registering the same weights returns the existing
version, so a re-run costs the gates' evaluation only. A training that a retry or a new run finds
unfinished (the flow killed mid-training) continues from its last checkpoint when that was written
with the same stamp, and starts over otherwise (tasks/training/resume.py).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from core import atomic
from core.config import Params, load_params
from flows.one_writer import holds_writer_slot
from flows.workspace import exclusive
from serving.bundle import bundle_sha, load_bundle_dir, read_meta
from tasks.evaluation import gates
from tasks.evaluation.latency import measure_latency
from tasks.evaluation.model_quality import evaluate_quality, flat_metrics, quality_markdown
from tasks.evaluation.sampling_search import choose_sampling
from tasks.release import candidate, flow_runs
from tasks.release.champion_judges import reevaluate_champion
from tasks.release.registry import RegisteredVersion, register_bundle
from tasks.training import launch
from tasks.training.distill_guidance import distill_guidance
from tasks.training.train_codec import CodecTrainResult, train_codec
from tasks.training.train_s2s import S2STrainResult, train_s2s


def with_thresholds(overrides: dict[str, Any] | None, thresholds: dict[str, Any] | None) -> dict[str, Any]:
    """Gate thresholds set in the UI ({"codec": {"min_stoi": 0.5}}) as params overrides."""
    merged = copy.deepcopy(overrides or {})
    if thresholds:
        merged.setdefault("gates", {})
        for gate, values in thresholds.items():
            merged["gates"].setdefault(gate, {}).update(values)
    return merged


@task(name="train-codec", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def train_codec_task(params: Params, parent_run_id: str) -> CodecTrainResult:
    """A retry, or a new flow run after a kill, continues last.pt when it has these settings."""
    if launch.is_distributed(params):  # torchrun on nodes x processes (params.yaml distributed)
        return CodecTrainResult(**launch.run_stage(params, "codec", resume="auto", parent_run_id=parent_run_id))
    return train_codec(params, resume="auto", parent_run_id=parent_run_id)


@task(name="train-s2s", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def train_s2s_task(params: Params, parent_run_id: str) -> S2STrainResult:
    if launch.is_distributed(params):
        return S2STrainResult(**launch.run_stage(params, "s2s", resume="auto", parent_run_id=parent_run_id))
    return train_s2s(params, resume="auto", parent_run_id=parent_run_id)


@task(name="distill-guidance", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def distill_task(params: Params, s2s: S2STrainResult, parent_run_id: str) -> S2STrainResult:
    """Guidance distilled into the trained model (s2s_distill.steps > 0), else the model as trained."""
    return distill_guidance(params, s2s, resume="auto", parent_run_id=parent_run_id)


@task(name="gate", cache_policy=NO_CACHE, task_run_name="{result.name}-gate")
def gate_task(params: Params, run_id: str, result: gates.GateResult) -> gates.GateResult:
    """Record a gate in MLflow and Prefect; raise GateFailed (after marking the run) if it failed."""
    flow_runs.log_gate(params, run_id, result)
    create_table_artifact(key=f"gate-{result.name}", table=result.rows(),
                          description=f"{result.name} gate: {'passed' if result.passed else 'FAILED: ' + result.reason}")
    if not result.passed:
        flow_runs.reject_run(params, run_id, result)
        raise gates.GateFailed(result)
    return result


@task(name="export-bundle", cache_policy=NO_CACHE)
def bundle_task(params: Params, codec: CodecTrainResult, s2s: S2STrainResult, meta: dict[str, Any]) -> Path:
    return candidate.export_candidate(params, codec, s2s, meta)


@task(name="evaluate-quality", cache_policy=NO_CACHE)
def quality_task(params: Params, bundle_dir: Path, parent_run_id: str) -> dict[str, Any]:
    """MOS, CER, emotion and speaker control of the candidate (evaluators reused per corpus), with
    the sampling settings chosen for it on the validation split when the profile lists candidates."""
    choose_sampling(bundle_dir, params, parent_run_id)
    report = evaluate_quality(load_bundle_dir(bundle_dir), params, bundle_sha(bundle_dir), parent_run_id)
    create_markdown_artifact(key="quality", markdown="# Quality of the candidate\n\n" + quality_markdown(report),
                             description="MOS, CER, emotion and speaker control: corpus, codec round trip, replies")
    return report


@task(name="measure-latency", cache_policy=NO_CACHE)
def latency_task(params: Params, bundle_dir: Path) -> dict[str, float]:
    return measure_latency(load_bundle_dir(bundle_dir), params)


@task(name="reevaluate-champion", cache_policy=NO_CACHE)
def reevaluate_champion_task(params: Params, judges: dict[str, str], parent_run_id: str) -> dict[str, Any]:
    """The champion's figures by the candidate's judges, so that promotion compares like with like."""
    done = reevaluate_champion(params, judges, parent_run_id)
    if done.get("judges"):
        get_run_logger().info("champion version %s: %s", done["version"],
                              "evaluated again by the candidate's judges" if done["reevaluated"]
                              else f"not evaluated again ({done.get('error')}): promotion is held back")
    return done


@task(name="register", cache_policy=NO_CACHE)
def register_task(params: Params, bundle_dir: Path, evaluation: dict[str, Any], tags: dict[str, str],
                  parent_run_id: str) -> RegisteredVersion:
    return register_bundle(bundle_dir, params, evaluation, tags, parent_run_id)


def summary_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Train flow ({result['profile']})", "",
             f"**Registered:** `{result['model']}` version {result['version']} "
             f"({', '.join(result['aliases']) or 'no alias'}){' (already registered)' if result['reused'] else ''}",
             "", "| gate | passed |", "|---|---|"]
    lines += [f"| {name} | {'yes' if gate['passed'] else 'no'} |" for name, gate in result["gates"].items()]
    lines += ["", "| stage | metric | value |", "|---|---|---|"]
    for stage, values in result["metrics"].items():
        if stage == "codec_baselines":
            continue
        lines += [f"| {stage} | {k} | {v:.4g} |" for k, v in values.items() if isinstance(v, (int, float))]
    lines += ["", "Stages reused (inputs unchanged): " + (", ".join(result["cached"]) or "none"), "",
              *(f"- {k}: {v}" for k, v in result["links"].items())]
    return "\n".join(lines) + "\n"


@flow(name="train", log_prints=True)
@holds_writer_slot
@exclusive("train flow")
def train_flow(profile: str = "smoke", overrides: dict[str, Any] | None = None,
               thresholds: dict[str, Any] | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train, gate and register a candidate; return its version, gates and metrics."""
    started = time.monotonic()
    logger = get_run_logger()
    params = load_params(profile, with_thresholds(overrides, thresholds))
    run_id = flow_runs.open_run(params, "train", parent_run_id)
    try:
        codec = train_codec_task(params, run_id)
        tags = flow_runs.flow_run_tags(params, "candidate")

        def export(codec: CodecTrainResult, s2s: S2STrainResult) -> Path:
            tags.update({"codec_run_id": str(codec.run_id), "s2s_run_id": str(s2s.run_id), "train_run_id": run_id})
            return bundle_task(params, codec, s2s, {"model_name": params.registry.model_name, **tags,
                                                    "bitrate_bps": codec.bitrate_bps})

        gated = gates.gate_candidate(params, codec, train_s2s=lambda: distill_task(params, train_s2s_task(params, run_id), run_id),
                                     export=export,
                                     evaluate_quality=lambda bundle: quality_task(params, bundle, run_id),
                                     measure_latency=lambda bundle: latency_task(params, bundle),
                                     record=lambda result: gate_task(params, run_id, result))
        s2s, bundle, quality, passed = gated.s2s, gated.bundle, gated.quality, gated.gates
        metrics = {"codec": codec.metrics, "codec_baselines": codec.baselines,
                   "s2s": {k: v for k, v in s2s.metrics.items() if k != "tokens"},
                   "cost": candidate.training_costs(params, codec, s2s), "quality": flat_metrics(quality),
                   "latency": gated.latency}
        tags |= {"quality_run_id": str(quality.get("run_id")),
                 **{f"evaluator.{k}_run_id": str(v) for k, v in quality["evaluators"]["runs"].items()}}
        evaluation = {"metrics": metrics, "gates": {g.name: g.to_dict() for g in passed},
                      "profile": params.profile, "corpus": flow_runs.corpus_facts(params),
                      "quality": {k: quality[k] for k in ("sets", "confusion", "labels", "working_share",
                                                          "evaluators")},
                      "runs": {"train": run_id, "codec": codec.run_id, "s2s": s2s.run_id,
                               "quality": quality.get("run_id"), **quality["evaluators"]["runs"]}}
        atomic.write_json(bundle / "bundle.json", {**read_meta(bundle), "metrics": metrics,
                                                   "gates": evaluation["gates"]})
        if params.registry.reevaluate_champion:
            reevaluate_champion_task(params, quality["evaluators"]["runs"], run_id)
        version = register_task(params, bundle, evaluation, tags, run_id)
    except gates.GateFailed as exc:
        logger.error("candidate refused: %s", exc)
        raise
    except BaseException:
        flow_runs.close_run(params, run_id, "FAILED")
        raise
    flow_runs.log_metrics(params, run_id, {f"{stage}.{k}": v for stage, values in metrics.items()
                                           if stage != "codec_baselines" for k, v in values.items()})
    flow_runs.set_tags(params, run_id, {"registered_model": version.name, "registered_version": version.version})
    flow_runs.close_run(params, run_id)
    result = {"profile": params.profile, "model": version.name, "version": version.version,
              "aliases": version.aliases, "reused": version.reused, "run_id": run_id, "bundle": str(bundle),
              "gates": evaluation["gates"], "metrics": metrics, "quality": evaluation["quality"],
              "cached": [name for name, r in (("codec", codec), ("s2s", s2s)) if r.cached],
              "seconds": round(time.monotonic() - started, 1),
              "links": flow_runs.ui_links(params, str(flow_run.id) if flow_run.id else None, version.version)}
    create_markdown_artifact(key="train-summary", markdown=summary_markdown(result),
                             description="Candidate trained, gated and registered by the train flow")
    create_table_artifact(key="train-metrics", description="Metrics of the candidate, by stage",
                          table=[{"stage": s, "metric": k, "value": round(float(v), 5)}
                                 for s, values in metrics.items() if s != "codec_baselines"
                                 for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)])
    return result
