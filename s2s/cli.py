"""The `s2s` command line (typer): one entry point for the tasks, flows and benchmarks.

Errors a user can cause (an unknown parameter or profile, a missing sources file) end with one
clear line and exit code 2, not a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from core.config import ConfigError, find_root, load_params, parse_overrides

app = typer.Typer(help="Telugu S2S pipeline.", no_args_is_help=True, add_completion=False)
corpus_app = typer.Typer(help="The embedded corpus.", no_args_is_help=True)
flow_app = typer.Typer(help="Run a Prefect flow.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: print figures and ratios.", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")
app.add_typer(flow_app, name="flow")
app.add_typer(bench_app, name="bench")
train_app = typer.Typer(help="Train the models (also under torchrun for DDP).", no_args_is_help=True)
app.add_typer(train_app, name="train")
signoff_app = typer.Typer(help="Sign-off report and approvals of a registered model version.", no_args_is_help=True)
app.add_typer(signoff_app, name="signoff")
console = Console()

ProfileOpt = typer.Option(None, "--profile", "-p", help="params.yaml profile (smoke, production)")
SetOpt = typer.Option(None, "--set", help="override a parameter: section.key=value (repeatable)")
ForceOpt = typer.Option(False, "--force", help="train even when a finished run has the same inputs")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code=2)


def _prefect_env() -> None:
    """Keep Prefect's state in the project (.prefect/) unless the user points elsewhere."""
    root = find_root()
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@corpus_app.command("synth")
def corpus_synth(profile: Optional[str] = ProfileOpt, out: Optional[Path] = typer.Option(None, help="output folder"),
                 set_: Optional[list[str]] = SetOpt) -> None:
    """Render the embedded Telugu corpus with espeak-ng and write its sources.yaml."""
    from tasks.data.synth_corpus import synthesize

    try:
        params = load_params(profile, parse_overrides(set_))
    except ConfigError as exc:
        _fail(str(exc))
    sources = synthesize(params, out)
    console.print(f"embedded corpus written; sources listed in [bold]{sources}[/]")


def print_summary(summary: dict) -> None:
    table = Table(title="Corpus", show_header=False)
    table.add_row("hours in", f"{summary['hours_in']:.3f} h ({summary['recordings']} recordings)")
    table.add_row("segments kept", f"{summary['segments_kept']} ({summary['kept_hours']:.3f} h)")
    table.add_row("segments quarantined", str(summary["segments_quarantined"]))
    for reason, count in summary["quarantine_reasons"].items():
        table.add_row(f"  {reason}", str(count))
    table.add_row("speakers", ", ".join(f"{k}={v}" for k, v in summary["speakers"].items()))
    table.add_row("emotions", ", ".join(f"{k}={v}" for k, v in summary["emotions"].items()))
    table.add_row("splits (segments)", ", ".join(f"{k}={v}" for k, v in summary["splits"].items()))
    table.add_row("pairs", str(summary["pairs"]))
    table.add_row("corpus hash", str(summary.get("corpus_hash")))
    table.add_row("flow time", f"{summary.get('extra', {}).get('seconds', '?')} s")
    console.print(table)
    for rid, failure in summary["sources_failed"].items():
        console.print(f"[yellow]refused[/] {rid}: {failure['error']}", soft_wrap=True)


@flow_app.command("data")
def flow_data(profile: Optional[str] = ProfileOpt,
              sources: Optional[Path] = typer.Option(None, help="sources.yaml (default: the embedded corpus)"),
              set_: Optional[list[str]] = SetOpt) -> None:
    """Download, normalize, segment, check, split, pair and version the corpus."""
    _prefect_env()
    try:
        overrides = parse_overrides(set_)
        params = load_params(profile, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    from flows.data_flow import data_flow
    from tasks.data.sources import SourcesError

    try:
        summary = data_flow(profile=params.profile, sources_file=str(sources) if sources else None,
                            overrides=overrides)
    except (SourcesError, ConfigError) as exc:
        _fail(str(exc))
    print_summary(summary)


def _thresholds(values: list[str] | None) -> dict:
    """--threshold codec.min_stoi=0.5 -> {"codec": {"min_stoi": 0.5}}."""
    return parse_overrides(values)


ThresholdOpt = typer.Option(None, "--threshold", help="override a gate threshold: gate.key=value (repeatable)")


def _run_gated(run) -> dict:
    """Run a flow that gates a candidate; a refused candidate or bad input ends with exit code 1/2."""
    from tasks.data.corpus_audio import CorpusError
    from tasks.data.sources import SourcesError
    from tasks.evaluation.gates import GateFailed

    try:
        return run()
    except GateFailed as exc:
        console.print(f"[bold red]candidate refused:[/] {exc}", soft_wrap=True)
        console.print("nothing was registered; the MLflow run is tagged rejected_by / rejection_reason", soft_wrap=True)
        raise typer.Exit(code=1)
    except (SourcesError, ConfigError, CorpusError) as exc:
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
    """MOS, CER, emotion and speaker figures of corpus audio, codec round trip and replies."""
    from tasks.evaluation.model_quality import table_rows

    table = Table(title=title)
    for column in ("figure", "corpus audio (ceiling)", "codec round trip", "generated replies"):
        table.add_column(column)
    for row in table_rows(quality):
        table.add_row(*row)
    console.print(table)
    replies = quality["sets"].get("replies", {})
    console.print(f"emotions working: {int(replies.get('emotions_working', 0))}/9, speakers working: "
                  f"{int(replies.get('speakers_working', 0))}/4 (recall and precision >= {quality['working_share']:.0%} "
                  "in the replies)", soft_wrap=True)


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
    latency through the serving path; writes artifacts/gates.json; exit code 1 when one fails."""
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
    results = [gates.codec_gate(codec.metrics, codec.baselines, params.gates.codec),
               gates.s2s_gate(s2s.metrics, params.codec.codebook_size, params.gates.s2s)]
    latency = {}
    if all(g.passed for g in results):
        bundle = candidate.export_candidate(params, codec, s2s, {"model_name": params.registry.model_name})
        latency = measure_latency(load_bundle_dir(bundle), params)
        results.append(gates.latency_gate(latency, params.gates.latency))
    report = {"passed": all(g.passed for g in results) and len(results) == 3, "latency": latency,
              "gates": {g.name: g.to_dict() for g in results}}
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


@signoff_app.command("report")
def signoff_report(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                   version: Optional[str] = typer.Option(None, help="model version (default: the challenger)"),
                   prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="also a Prefect artifact")) -> None:
    """Render the sign-off report of a model version (markdown; MLflow and Prefect artifacts)."""
    if prefect:
        _prefect_env()
    from tasks.release import signoff

    params = _params(profile, set_)
    try:
        markdown, path = signoff.publish_report(params, version, prefect=prefect)
    except LookupError as exc:
        _fail(str(exc))
    console.print(markdown, markup=False, soft_wrap=True)
    console.print(f"report written to {path}")


@signoff_app.command("approve")
def signoff_approve(role: str = typer.Option(..., help="technical_lead | project_manager | business_head"),
                    name: str = typer.Option(..., help="the reviewer's name"),
                    version: Optional[str] = typer.Option(None, help="model version (default: the challenger)"),
                    profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Approve a version in a role; it becomes champion once every required role approved."""
    from tasks.release import signoff

    params = _params(profile, set_)
    try:
        status = signoff.approve(params, role, name, version)
        signoff.publish_report(params, status["version"], prefect=False)
    except (ValueError, PermissionError, LookupError) as exc:
        _fail(str(exc))
    console.print(f"{status['name']} version {status['version']}: approved by {', '.join(status['approved'])}")
    if status["promoted"]:
        console.print(f"[green]promoted to champion[/]")
    else:
        console.print(f"still needed for champion: {', '.join(status['missing'])}")


@app.command("publish")
def publish_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                model: str = typer.Option("champion", help="alias or version number of the registered model")) -> None:
    """Publish a registered model to the Hugging Face Hub (HF_TOKEN), or write the bundle locally."""
    from core.tracking import tracking_uri
    from serving.bundle import BundleError
    from serving.bundle import download_bundle
    from tasks.release.publish import PublishError, publish_bundle

    params = _params(profile, set_)
    name = params.registry.model_name
    uri = f"models:/{name}/{model}" if model.isdigit() else f"models:/{name}@{model}"
    try:
        bundle = download_bundle(uri, tracking_uri(params.root, params.mlflow.tracking_uri))
        report = publish_bundle(bundle, params.publish, params.path(params.publish.out_dir))
    except (BundleError, PublishError) as exc:
        _fail(str(exc))
    console.print(report.message, soft_wrap=True)


@app.command("serve")
def serve_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
              model: Optional[str] = typer.Option(None, help="models:/name@alias, models:/name/N or a bundle folder "
                                                               "(default: serving.model)"),
              host: Optional[str] = typer.Option(None, help="default: serving.host (127.0.0.1)"),
              port: Optional[int] = typer.Option(None, help="default: serving.port")) -> None:
    """Serve the model: /ws streaming speech, /stats, /healthz, /metrics and the demo page at /."""
    from serving.bundle import BundleError
    from serving.server import serve

    params = _params(profile, set_)
    try:
        serve(params, model, host, port)
    except BundleError as exc:
        _fail(f"{exc}\nno model to serve: run `make pipeline` (registers models:/telugu-s2s@champion) "
              "or pass --model with a bundle folder")


def _register_loadtest() -> None:
    from tasks.benchmarks.loadtest import loadtest_command

    app.command("loadtest", help="Concurrent WebSocket clients speaking test-split utterances: latency, "
                                 "errors, drops; writes docs/benchmarks.md.")(loadtest_command)


_register_loadtest()


@bench_app.command("segment")
def bench_segment(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                  json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures here")) -> None:
    """Segmentation against the synthetic ground truth, and VAD + quality throughput."""
    from tasks.benchmarks.bench_segment import print_report, run_benchmark

    try:
        params = load_params(profile, parse_overrides(set_))
    except ConfigError as exc:
        _fail(str(exc))
    report = run_benchmark(params)
    print_report(report, console)
    if json_out:
        from core import atomic

        atomic.write_text(json_out, json.dumps(report, indent=2) + "\n")


def _params(profile: str | None, set_: list[str] | None):
    try:
        return load_params(profile, parse_overrides(set_))
    except ConfigError as exc:
        _fail(str(exc))


@train_app.command("codec")
def train_codec_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint"),
                    max_steps: Optional[int] = typer.Option(None, help="stop after this many steps in all"),
                    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not log to MLflow"),
                    force: bool = ForceOpt) -> None:
    """Train TeluCodec on the corpus and score it on the test split."""
    from tasks.data.corpus_audio import CorpusError
    from tasks.training.train_codec import train_codec

    params = _params(profile, set_)
    try:
        result = train_codec(params, resume=resume, max_steps=max_steps, track=not no_mlflow, force=force)
    except (CorpusError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if result.metrics:
        _print_scores("codec (test split)", {"TeluCodec": result.metrics, **result.baselines})
        if result.cached:
            console.print("[dim]reused the finished run: corpus, settings and code unchanged (--force retrains)[/]")
        console.print(f"{result.steps} steps in {result.seconds:.0f} s, {result.bitrate_bps:.0f} bps; "
                      f"checkpoint {result.checkpoint}; MLflow run {result.run_id}")


@train_app.command("s2s")
def train_s2s_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                  resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint"),
                  max_steps: Optional[int] = typer.Option(None, help="stop after this many steps in all"),
                  no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not log to MLflow"),
                  force: bool = ForceOpt) -> None:
    """Tokenize the corpus with the trained codec (if needed) and train the S2S transformer."""
    from tasks.data.corpus_audio import CorpusError
    from tasks.training.train_s2s import train_s2s

    params = _params(profile, set_)
    try:
        result = train_s2s(params, resume=resume, max_steps=max_steps, track=not no_mlflow, force=force)
    except (CorpusError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if result.metrics:
        _print_scores("S2S (validation split)", {"S2S": result.metrics, "uniform": result.baselines})
        if result.cached:
            console.print("[dim]reused the finished run: tokens, settings and code unchanged (--force retrains)[/]")
        console.print(f"{result.steps} steps in {result.seconds:.0f} s; checkpoint {result.checkpoint}; "
                      f"MLflow run {result.run_id}")


def _print_scores(title: str, rows: dict[str, dict[str, float]]) -> None:
    columns = sorted({k for r in rows.values() for k in r})
    table = Table(title=title)
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{values[c]:.3f}" if c in values else "-" for c in columns))
    console.print(table)


@bench_app.command("codec")
def bench_codec_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                    threads: int = typer.Option(1, help="torch threads (1 = one CPU stream)")) -> None:
    """Encode/decode real-time factors and streaming decode latency of the trained codec."""
    from tasks.benchmarks.bench_models import bench_codec

    _print_figures("s2s bench codec", bench_codec(_params(profile, set_), threads=threads))


@bench_app.command("s2s")
def bench_s2s_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                  threads: int = typer.Option(1, help="torch threads")) -> None:
    """Generation tokens/s at batch 1 and 64 with the KV cache, and time to the first reply frame."""
    from tasks.benchmarks.bench_models import bench_s2s

    _print_figures("s2s bench s2s", bench_s2s(_params(profile, set_), threads=threads))


def _print_figures(title: str, figures: dict) -> None:
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, str(value))
    console.print(table)
    console.print_json(data=figures)


if __name__ == "__main__":
    app()
