"""What every command group of the `s2s` CLI shares: the typer apps, the console, the common
options and the one-line errors (exit code 2) for mistakes a user can make."""

from __future__ import annotations

import os

import typer
from rich.console import Console

from core.config import ConfigError, find_root, load_params, parse_overrides
from flows.one_writer import LEASE_STORAGE

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
ThresholdOpt = typer.Option(None, "--threshold", help="override a gate threshold: gate.key=value (repeatable)")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code=2)


def _prefect_env() -> None:
    """Keep Prefect's state in the project (.prefect/) unless the user points elsewhere, with the
    concurrency leases on disk there, so a run killed with its temporary server cannot hold the
    writer slot for ever (flows/one_writer.py)."""
    root = find_root()
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", LEASE_STORAGE)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _params(profile: str | None, set_: list[str] | None):
    try:
        return load_params(profile, parse_overrides(set_))
    except ConfigError as exc:
        _fail(str(exc))


def _thresholds(values: list[str] | None) -> dict:
    """--threshold codec.min_stoi=0.5 -> {"codec": {"min_stoi": 0.5}}."""
    return parse_overrides(values)
