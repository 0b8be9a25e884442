"""`s2s train`, `s2s flow train|pipeline`, `s2s gates` and `s2s eval`: training a candidate,
gating it and measuring its quality."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from core.config import ConfigError, load_params, parse_overrides
from s2s.common import (ForceOpt, ProfileOpt, SetOpt, ThresholdOpt, _fail, _params, _prefect_env, _thresholds, app,
                        console, flow_app, train_app)
from s2s.data_commands import print_summary

ParentRunOpt = typer.Option(None, "--parent-run-id", help="MLflow run to nest this stage's run under (the train "
                                                         "flow's, when it launches the stage through torchrun)")


def _run_gated(run) -> dict:
    """Run a flow that gates a candidate; a refused candidate or bad input ends with exit code 1/2."""
    from core.workspace_lock import WorkspaceBusy
    from tasks.data.corpus_audio import CorpusError
    from tasks.data.sources import SourcesError
    from tasks.evaluation.gates import GateFailed

    try:
        return run()
    except GateFailed as exc:
        console.print(f"[bold red]candidate refused:[/] {exc}", soft_wrap=True)
        console.print("nothing was registered; the MLflow run is tagged rejected_by / rejection_reason", soft_wrap=True)
        raise typer.Exit(code=1)
    except (SourcesError, ConfigError, CorpusError, WorkspaceBusy) as exc:
        _fail(str(exc))


def print_candidate(result: dict) -> None:
    table = Table(title=f"Candidate: {result['model']} version {result['version']}")
    for column in ("gate", "metric", "value", "rule", "passed"):
        table.add_column(column)
    for gate in result["gates"].values():
        for check in gate["checks"]:
            value = "-" if check["value"] is None else f"{check['value']:.4g}"
            table.add_row(gate["name"], check["metric"], value, f"{check['op']} {check['threshold']:.4g}",
                          "[green]yes[/]" if check["passed"] else "[red]no[/]")
    console.print(table)
    state = "already registered (same weights)" if result["reused"] else "registered"
    console.print(f"[bold]{result['model']}[/] version [bold]{result['version']}[/] {state}; aliases: "
                  f"{', '.join(result['aliases']) or 'none'}; stages reused: {', '.join(result['cached']) or 'none'}",
                  soft_wrap=True)


def print_quality(quality: dict, title: str = "Quality (tasks/evaluation/model_quality.py)") -> None:
    """MOS, CER, emotion and speaker figures of each audio set (corpus, round trip, replies, renderings)."""
    from tasks.evaluation.model_quality import SET_TITLES, table_rows, working_sentence

    table = Table(title=title)
    for column in ("figure", *SET_TITLES):
        table.add_column(column)
    for row in table_rows(quality):
        table.add_row(*row)
    console.print(table)
    console.print(working_sentence(quality), soft_wrap=True)


def print_links(links: dict) -> None:
    console.print("[bold]Where to look[/] (start both UIs with `make ui`):")
    for key, value in links.items():
        console.print(f"  {key}: {value}", soft_wrap=True)


@flow_app.command("train")
def flow_train(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
               threshold: Optional[list[str]] = ThresholdOpt) -> None:
    """Train the codec and the S2S model, gate them, and register the candidate in MLflow."""
    _prefect_env()
    params = _params(profile, set_)
    from flows.train_flow import train_flow

    result = _run_gated(lambda: train_flow(profile=params.profile, overrides=parse_overrides(set_),
                                           thresholds=_thresholds(threshold)))
    print_quality(result["quality"])
    print_candidate(result)
    console.print(f"train flow: {result['seconds']} s")
    print_links(result["links"])


@flow_app.command("pipeline")
def flow_pipeline(profile: Optional[str] = ProfileOpt,
                  sources: Optional[Path] = typer.Option(None, help="sources.yaml (default: the embedded corpus)"),
                  set_: Optional[list[str]] = SetOpt, threshold: Optional[list[str]] = ThresholdOpt,
                  publish: bool = typer.Option(True, "--publish/--no-publish", help="publish to the Hub at the end")) -> None:
    """The whole chain: data -> codec -> gates -> S2S -> gates -> latency -> register -> sign-off -> publish."""
    import time

    _prefect_env()
    params = _params(profile, set_)
    from flows.pipeline_flow import pipeline_flow

    started = time.monotonic()
    result = _run_gated(lambda: pipeline_flow(profile=params.profile, sources_file=str(sources) if sources else None,
                                              overrides=parse_overrides(set_), thresholds=_thresholds(threshold),
                                              publish=publish))
    print_summary(result["corpus"])
    print_quality(result["train"]["quality"])
    print_candidate(result["train"])
    if result["publish"]:
        console.print(f"publish: {result['publish'].get('message', result['publish'].get('mode'))}", soft_wrap=True)
    print_links(result["links"])
    console.print(f"[bold]pipeline finished in {time.monotonic() - started:.1f} s[/] "
                  f"(flow {result['seconds']} s)")


@app.command("gates")
def gates_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
              threshold: Optional[list[str]] = ThresholdOpt) -> None:
    """Gate the trained candidate without Prefect (the dvc.yaml `gates` stage): codec, S2S, then
    latency through the serving path; writes artifacts/gates.json; exit code 1 when one fails.

    The sequence is the train flow's (tasks/evaluation/gates.py gate_candidate) and stops at the
    first gate that fails; the quality gate is the `quality` stage's (`s2s eval --gate`)."""
    from core import atomic
    from serving.bundle import load_bundle_dir
    from tasks.evaluation import gates
    from tasks.evaluation.latency import measure_latency
    from tasks.release import candidate

    overrides = parse_overrides(set_)
    if threshold:
        overrides.setdefault("gates", {}).update(_thresholds(threshold))
    try:
        params = load_params(profile, overrides)
        codec, s2s = candidate.load_results(params)
    except (ConfigError, FileNotFoundError) as exc:
        _fail(str(exc))
    gated = gates.gate_candidate(
        params, codec, train_s2s=lambda: s2s,
        export=lambda codec, s2s: candidate.export_candidate(params, codec, s2s,
                                                             {"model_name": params.registry.model_name}),
        measure_latency=lambda bundle: measure_latency(load_bundle_dir(bundle), params))
    results = gated.gates
    report = {"passed": gated.passed, "latency": gated.latency, "gates": {g.name: g.to_dict() for g in results}}
    atomic.write_json(params.path(params.paths.artifacts) / "gates.json", report)
    for gate in results:
        console.print(f"{gate.name}: " + ("[green]passed[/]" if gate.passed else f"[red]failed[/]: {gate.reason}"),
                      soft_wrap=True)
    if not report["passed"]:
        raise typer.Exit(code=1)


@app.command("eval")
def eval_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
             model: str = typer.Option("champion", help="alias or version number of the registered model, "
                                                         "or a bundle folder"),
             force: bool = typer.Option(False, help="retrain the evaluators even if this corpus has them"),
             out: Optional[Path] = typer.Option(None, help="also write the report here (the dvc.yaml quality stage)"),
             gate: bool = typer.Option(False, help="apply the profile's quality gate: exit code 1 when it fails"),
             choose_sampling: bool = typer.Option(False, "--choose-sampling",
                                                  help="a bundle folder: first choose its sampling settings on the "
                                                       "validation split (evaluation.sampling_candidates) and record "
                                                       "them in its bundle.json"),
             threshold: Optional[list[str]] = ThresholdOpt) -> None:
    """Measure a model's quality: MOS (DNSMOS, DistillMOS), CER, emotion and speaker control.

    Trains the evaluators once per corpus version; logs an MLflow run `quality`; a registered
    version also gets the figures as tags (quality.*), which its sign-off report shows."""
    from core import atomic
    from core.tracking import tracking_uri
    from serving.bundle import BundleError, bundle_sha, load_bundle_dir
    from serving.bundle import download_bundle
    from tasks.data.corpus_audio import CorpusError
    from tasks.evaluation.gates import quality_gate
    from tasks.evaluation.model_quality import evaluate_quality, record_on_version

    overrides = parse_overrides(set_)
    if threshold:
        overrides.setdefault("gates", {}).update(_thresholds(threshold))
    try:
        params = load_params(profile, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    name = params.registry.model_name
    folder = Path(model).expanduser()
    version = None
    try:
        if folder.is_dir():
            bundle_dir = folder
            if choose_sampling:
                from tasks.evaluation.sampling_search import choose_sampling as choose

                choice = choose(bundle_dir, params, use_mlflow=False)
                for row in (choice or {}).get("rows", []):
                    console.print(f"sampling {row['settings']}: errors {row['errors']:.3f} (intelligibility CER "
                                  f"{row['intelligibility_cer']}, speaker {row['speaker_control']}, emotion "
                                  f"{row['emotion_control']})", soft_wrap=True)
                console.print(f"chosen on the validation split: {(choice or {}).get('chosen', 'nothing to choose')}",
                              soft_wrap=True)
        elif choose_sampling:
            _fail("--choose-sampling needs a bundle folder (a registered version's bundle is read-only: the train "
                  "flow chooses before registering)")
        else:
            uri = f"models:/{name}/{model}" if model.isdigit() else f"models:/{name}@{model}"
            bundle_dir = download_bundle(uri, tracking_uri(params.root, params.mlflow.tracking_uri))
            version = model
        report = evaluate_quality(load_bundle_dir(bundle_dir), params, bundle_sha(bundle_dir), force=force)
    except (BundleError, CorpusError, ConfigError) as exc:
        _fail(str(exc))
    print_quality(report)
    if version is not None:
        shown = record_on_version(params, version, report)
        console.print(f"recorded on {name} version {shown} (tags quality.*, quality_run_id)", soft_wrap=True)
    verdict = quality_gate(report, params.gates.quality)
    if out is not None:
        atomic.write_json(out, {"gate": verdict.to_dict(), **{k: report[k] for k in ("bundle", "profile", "sets",
                                                                                      "run_id")}})
    console.print(f"quality.json: {report['path']}; MLflow run: {report.get('run_id')}; {report['seconds']} s"
                  f"{' (reused: same model, evaluators and settings)' if report.get('cached') else ''}", soft_wrap=True)
    console.print("quality gate: " + ("[green]passed[/]" if verdict.passed else f"[red]failed[/]: {verdict.reason}"),
                  soft_wrap=True)
    if gate and not verdict.passed:
        raise typer.Exit(code=1)


@app.command("curve")
def curve_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
              replies: bool = typer.Option(False, "--replies", help="also score each S2S snapshot's replies "
                                                                   "(intelligibility, controls, MOS)")) -> None:
    """The time-quality curve of the profile's last trainings (points at their curve_steps)."""
    from tasks.evaluation.training_curve import curve_markdown, training_curve

    try:
        params = load_params(profile, parse_overrides(set_))
    except ConfigError as exc:
        _fail(str(exc))
    report = training_curve(params, score_replies=replies)
    console.print(curve_markdown(report), soft_wrap=True)
    console.print(f"written: {params.path(params.paths.artifacts)}/curve-{params.profile}.md", soft_wrap=True)


AutoResumeOpt = typer.Option(False, "--auto-resume", help="continue from the last checkpoint when it was made with "
                             "these settings (corpus, settings, code), else start over; what the flows do")


@train_app.command("codec")
def train_codec_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint"),
                    auto_resume: bool = AutoResumeOpt,
                    max_steps: Optional[int] = typer.Option(None, help="stop after this many steps in all"),
                    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not log to MLflow"),
                    force: bool = ForceOpt, parent_run_id: Optional[str] = ParentRunOpt) -> None:
    """Train TeluCodec on the corpus and score it on the test split."""
    from tasks.data.corpus_audio import CorpusError
    from tasks.training.shards import SharedFolderError
    from tasks.training.tracker import TrackingStoreError
    from tasks.training.train_codec import train_codec

    params = _params(profile, set_)
    try:
        result = train_codec(params, resume=resume or ("auto" if auto_resume else False), max_steps=max_steps,
                             track=not no_mlflow, force=force, parent_run_id=parent_run_id)
    except (CorpusError, FileNotFoundError, ValueError, SharedFolderError, TrackingStoreError) as exc:
        _fail(str(exc))
    if result.metrics:
        rows = {"TeluCodec": result.metrics, **result.baselines}
        _print_scores("codec (test split)", {n: {k: v for k, v in r.items() if not k.startswith("unseen_")}
                                             for n, r in rows.items()})
        _print_scores("codec (unseen voices)", {n: {k.removeprefix("unseen_"): v for k, v in r.items()
                                                    if k.startswith("unseen_")} for n, r in rows.items()})
        if result.cached:
            console.print("[dim]reused the finished run: corpus, settings and code unchanged (--force retrains)[/]")
        console.print(f"{result.steps} steps in {result.seconds:.0f} s, {result.bitrate_bps:.0f} bps; "
                      f"checkpoint {result.checkpoint}; MLflow run {result.run_id}")


@train_app.command("s2s")
def train_s2s_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                  resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint"),
                  auto_resume: bool = AutoResumeOpt,
                  max_steps: Optional[int] = typer.Option(None, help="stop after this many steps in all"),
                  no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not log to MLflow"),
                  force: bool = ForceOpt, parent_run_id: Optional[str] = ParentRunOpt) -> None:
    """Tokenize the corpus with the trained codec (if needed) and train the S2S transformer; then,
    when the profile sets s2s_distill.steps, distil guidance into it (tasks/training/distill_guidance.py)."""
    from tasks.data.corpus_audio import CorpusError
    from tasks.training.shards import SharedFolderError
    from tasks.training.distill_guidance import distill_guidance
    from tasks.training.tracker import TrackingStoreError
    from tasks.training.train_s2s import train_s2s

    params = _params(profile, set_)
    resumed = resume or ("auto" if auto_resume else False)
    try:
        result = train_s2s(params, resume=resumed, max_steps=max_steps, track=not no_mlflow, force=force,
                           parent_run_id=parent_run_id)
        if params.s2s_distill.steps > 0 and result.metrics:  # rank 0 of a torchrun, or the only process
            _print_scores("S2S as trained (validation split)", {"S2S": result.metrics, "uniform": result.baselines})
            result = distill_guidance(params, result, resume="auto" if resumed else False, track=not no_mlflow,
                                      force=force, parent_run_id=parent_run_id)
    except (CorpusError, FileNotFoundError, ValueError, SharedFolderError, TrackingStoreError) as exc:
        _fail(str(exc))
    if result.metrics:
        _print_scores("S2S (validation split)", {"S2S": result.metrics, "uniform": result.baselines})
        if result.cached:
            console.print("[dim]reused the finished run: tokens, settings and code unchanged (--force retrains)[/]")
        console.print(f"{result.steps} steps in {result.seconds:.0f} s; checkpoint {result.checkpoint}; "
                      f"MLflow run {result.run_id}")


@train_app.command("node")
def train_node_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                   stage: Optional[list[str]] = typer.Option(None, help="codec or s2s (repeatable; default: both, "
                                                                        "in the flow's order)"),
                   no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not log to MLflow")) -> None:
    """Join a multi-node train flow from another machine: the flow's torchrun launches (params.yaml
    `distributed`), with the same profile and --set overrides as the flow (docs/scaling.md)."""
    from tasks.training.launch import STAGES, LaunchError, run_node

    params = _params(profile, set_)
    stages = stage or list(STAGES)
    if unknown := [s for s in stages if s not in STAGES]:
        _fail(f"unknown stage {unknown[0]!r}: {' or '.join(STAGES)}")
    if params.distributed.nnodes < 2:
        _fail(f"distributed.nnodes is {params.distributed.nnodes}: a node joins only a multi-node training "
              "(--set distributed.nnodes=2 ...)")
    try:
        run_node(params, stages, track=not no_mlflow)
    except LaunchError as exc:
        _fail(str(exc))
    console.print(f"node finished: {', '.join(stages)}")


def _print_scores(title: str, rows: dict[str, dict[str, float]]) -> None:
    columns = sorted({k for r in rows.values() for k in r})
    table = Table(title=title)
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{values[c]:.3f}" if c in values else "-" for c in columns))
    console.print(table)
