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


if __name__ == "__main__":
    app()
