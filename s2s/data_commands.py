"""`s2s corpus synth` and `s2s flow data`: building the corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from core.config import ConfigError, load_params, parse_overrides
from s2s.common import ProfileOpt, SetOpt, _fail, _prefect_env, console, corpus_app, flow_app


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
    from core.workspace_lock import WorkspaceBusy
    from flows.data_flow import data_flow
    from tasks.data.sources import SourcesError

    try:
        summary = data_flow(profile=params.profile, sources_file=str(sources) if sources else None,
                            overrides=overrides)
    except (SourcesError, ConfigError, WorkspaceBusy) as exc:
        _fail(str(exc))
    print_summary(summary)


@corpus_app.command("digests")
def corpus_digests(write: bool = typer.Option(False, "--write", help="write data.digests from the corpus on disk"),
                   data: Optional[Path] = typer.Option(None, help="corpus folder (default: paths.data)"),
                   digest_file: Optional[Path] = typer.Option(None, "--file", help="default: data.digests in the root")
                   ) -> None:
    """Check the corpus on disk file by file against data.digests (or write it): names what differs."""
    from tasks.data import digests

    params = load_params(None)
    folder = data or params.path(params.paths.data)
    listing = digest_file or params.path(digests.DIGESTS_FILE)
    if not folder.is_dir():
        _fail(f"no corpus at {folder}: run `s2s flow data` (or `dvc checkout data.dvc`) first")
    actual = digests.tree_digests(folder)
    if write:
        digests.write(listing, actual)
        console.print(f"{len(actual)} files listed in [bold]{listing}[/]")
        return
    if not listing.is_file():
        _fail(f"no digest list at {listing}: `s2s corpus digests --write` makes one")
    differences = digests.compare(digests.read(listing), actual)
    for line in differences:
        console.print(line, soft_wrap=True)
    if differences:
        for line in digests.version_differences(listing):
            console.print(f"[yellow]tool version[/] {line}", soft_wrap=True)
        _fail(f"{len(differences)} of {len(actual)} files differ from {listing}")
    console.print(f"all {len(actual)} files match {listing}")
