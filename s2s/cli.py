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

from s2s.config import ConfigError, find_root, load_params, parse_overrides

app = typer.Typer(help="Telugu S2S pipeline.", no_args_is_help=True, add_completion=False)
corpus_app = typer.Typer(help="The embedded corpus.", no_args_is_help=True)
flow_app = typer.Typer(help="Run a Prefect flow.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: print figures and ratios.", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")
app.add_typer(flow_app, name="flow")
app.add_typer(bench_app, name="bench")
train_app = typer.Typer(help="Train the models (also under torchrun for DDP).", no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console()

ProfileOpt = typer.Option(None, "--profile", "-p", help="params.yaml profile (smoke, production)")
SetOpt = typer.Option(None, "--set", help="override a parameter: section.key=value (repeatable)")


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
    from tasks.synth_corpus import synthesize

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
    from tasks.sources import SourcesError

    try:
        summary = data_flow(profile=params.profile, sources_file=str(sources) if sources else None,
                            overrides=overrides)
    except (SourcesError, ConfigError) as exc:
        _fail(str(exc))
    print_summary(summary)


@bench_app.command("segment")
def bench_segment(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                  json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures here")) -> None:
    """Segmentation against the synthetic ground truth, and VAD + quality throughput."""
    from tasks.bench_segment import print_report, run_benchmark

    try:
        params = load_params(profile, parse_overrides(set_))
    except ConfigError as exc:
        _fail(str(exc))
    report = run_benchmark(params)
    print_report(report, console)
    if json_out:
        from tasks import atomic

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
                    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not log to MLflow")) -> None:
    """Train TeluCodec on the corpus and score it on the test split."""
    from tasks.corpus_audio import CorpusError
    from tasks.train_codec import train_codec

    params = _params(profile, set_)
    try:
        result = train_codec(params, resume=resume, max_steps=max_steps, track=not no_mlflow)
    except (CorpusError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if result.metrics:
        _print_scores("codec (test split)", {"TeluCodec": result.metrics, **result.baselines})
        console.print(f"{result.steps} steps in {result.seconds:.0f} s, {result.bitrate_bps:.0f} bps; "
                      f"checkpoint {result.checkpoint}; MLflow run {result.run_id}")


@train_app.command("s2s")
def train_s2s_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                  resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint"),
                  max_steps: Optional[int] = typer.Option(None, help="stop after this many steps in all"),
                  no_mlflow: bool = typer.Option(False, "--no-mlflow", help="do not log to MLflow")) -> None:
    """Tokenize the corpus with the trained codec (if needed) and train the S2S transformer."""
    from tasks.corpus_audio import CorpusError
    from tasks.train_s2s import train_s2s

    params = _params(profile, set_)
    try:
        result = train_s2s(params, resume=resume, max_steps=max_steps, track=not no_mlflow)
    except (CorpusError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if result.metrics:
        _print_scores("S2S (validation split)", {"S2S": result.metrics, "uniform": result.baselines})
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
    from tasks.bench_models import bench_codec

    _print_figures("s2s bench codec", bench_codec(_params(profile, set_), threads=threads))


@bench_app.command("s2s")
def bench_s2s_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                  threads: int = typer.Option(1, help="torch threads")) -> None:
    """Generation tokens/s at batch 1 and 64 with the KV cache, and time to the first reply frame."""
    from tasks.bench_models import bench_s2s

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
