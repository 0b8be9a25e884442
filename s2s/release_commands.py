"""`s2s signoff`, `s2s publish` and `s2s serve`: from a registered version to users."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from s2s.common import ProfileOpt, SetOpt, _fail, _params, _prefect_env, app, console, signoff_app


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


@signoff_app.command("summary")
def signoff_summary(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                    version: Optional[str] = typer.Option(None, help="model version (default: the champion)"),
                    out: Optional[Path] = typer.Option(None, help="also write it here, e.g. EXECUTIVE_SUMMARY.md")) -> None:
    """Write the one-page executive summary of a version (markdown; MLflow artifact of the version)."""
    from tasks.release.executive_summary import write_summary

    params = _params(profile, set_)
    try:
        markdown, path = write_summary(params, version, out)
    except (LookupError, ValueError) as exc:
        _fail(str(exc))
    console.print(markdown, markup=False, soft_wrap=True)
    console.print(f"summary written to {path}")


@signoff_app.command("demo")
def signoff_demo(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                 model: Optional[str] = typer.Option(None, help="models:/name@alias, models:/name/N or a bundle folder "
                                                                  "(default: serving.model, the champion)")) -> None:
    """Record the demo page through one turn (video, reply audio, figures): artifacts/signoff/demo and MLflow."""
    from tasks.benchmarks.load_client import LoadTestError
    from tasks.data.corpus_audio import CorpusError
    from tasks.release.demo_page import DemoPageError
    from tasks.release.demo_recording import demo_dir, record_demo

    params = _params(profile, set_)
    try:
        record = record_demo(params, model, set_ or [], profile)
    except (CorpusError, DemoPageError, LoadTestError, RuntimeError) as exc:
        _fail(str(exc))
    reply = record["reply_end"]["metrics"]
    console.print(f"one turn recorded ({record['voice']['speaker']} / {record['voice']['emotion']}): reply "
                  f"{reply['reply_seconds']:.2f} s, first audio {record['page']['first_audio_ms']:.0f} ms on the page, "
                  f"text: {record['page']['reply_text']}", soft_wrap=True)
    console.print(f"written to {demo_dir(params)}/ (demo.webm, reply.wav, demo.json)")
    if record.get("mlflow"):
        console.print(f"MLflow artifacts {record['mlflow']['artifact_path']}/ of run {record['mlflow']['run_id']} "
                      f"(version {record['model']['version']})")
    else:
        console.print("not a registered version: no MLflow artifacts")


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


@signoff_app.command("rollback")
def signoff_rollback(to: str = typer.Option(..., "--to", help="the earlier champion's version number"),
                     why: str = typer.Option(..., help="recorded on both versions"),
                     profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Make an earlier champion the champion again; restart the servers to serve it."""
    from tasks.release.registry import mlflow_client, rollback

    params = _params(profile, set_)
    try:
        replaced = rollback(mlflow_client(params), params.registry.model_name, to, why)
    except (ValueError, PermissionError) as exc:
        _fail(str(exc))
    except Exception as exc:  # MlflowException: no such version
        _fail(f"cannot roll back to version {to}: {exc}")
    console.print(f"champion is now version {to} (was {replaced}); restart `s2s serve` to serve it")


@app.command("publish")
def publish_cmd(profile: Optional[str] = ProfileOpt, set_: Optional[list[str]] = SetOpt,
                model: str = typer.Option("champion", help="alias or version number of the registered model")) -> None:
    """Publish a registered model to the Hugging Face Hub (HF_TOKEN), or write the bundle locally."""
    from core.tracking import tracking_uri
    from serving.bundle import BundleError
    from serving.bundle import download_bundle
    from tasks.release.publish import publish_bundle
    from tasks.release.staging import PublishError

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
