"""The train flow through Prefect: gates, registry aliases, nested MLflow runs, re-runs that
reuse finished stages, a refused candidate, sign-off and promotion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.config import load_params

from .conftest import LENIENT, TINY, cli_sets

pytestmark = pytest.mark.slow



def _client(project_root: Path):
    from tasks.release.registry import mlflow_client

    return mlflow_client(load_params("smoke", root=project_root))


def test_train_flow_registers_a_gated_candidate_and_reruns_from_cache(tiny_corpus: Path, project_root: Path,
                                                                       prefect_harness, one_thread):
    import mlflow

    from flows.train_flow import train_flow
    from serving.bundle import load_bundle

    result = train_flow(profile="smoke", overrides=TINY, thresholds=LENIENT)
    assert result["version"] == "1" and set(result["aliases"]) == {"challenger", "champion"}
    assert all(g["passed"] for g in result["gates"].values())
    assert set(result["gates"]) == {"codec", "s2s", "quality", "latency"}
    assert result["metrics"]["latency"]["turns"] == 10 and result["metrics"]["latency"]["first_audio_mean_ms"] > 0
    assert result["cached"] == []

    client = _client(project_root)
    version = client.get_model_version("telugu-s2s", "1")
    assert version.tags["gates_passed"] == "true" and version.tags["gate.latency"] == "passed"
    assert float(version.tags["s2s.perplexity"]) == pytest.approx(result["metrics"]["s2s"]["perplexity"], rel=1e-3)
    assert version.tags["corpus_hash"] == "unversioned" and version.tags["git_commit"]
    assert "Load it:" in version.description and "mlflow.pyfunc.load_model(\"models:/telugu-s2s/1\")" in version.description

    # every stage is a run nested under the train run
    train_run = result["run_id"]
    children = client.search_runs([client.get_run(train_run).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{train_run}'")
    assert {r.data.tags["stage"] for r in children} == {"codec", "align", "s2s", "register", "quality", "asr",
                                                        "emotion-classifier", "speaker-classifier"}
    quality = result["quality"]["sets"]
    assert quality["replies"]["items"] == 12 and quality["corpus"]["items"] == 2  # 9 emotions + 3 other speakers
    assert {"distillmos", "cer", "emotion_accuracy", "speaker_accuracy"} <= set(quality["corpus"])
    assert {"emotion_control", "speaker_control", "emotions_working"} <= set(quality["replies"])
    assert version.tags["evaluator.asr_run_id"] == result["quality"]["evaluators"]["runs"]["asr"]
    assert client.get_run(train_run).data.tags["gate.codec"] == "passed"

    # loadable by MLflow's pyfunc loader and by the project's own loader
    model = mlflow.pyfunc.load_model("models:/telugu-s2s@champion")
    speech = np.sin(np.linspace(0, 400, 16000)).astype(np.float32) * 0.1
    reply = model.predict(pd.DataFrame({"audio": [speech.tolist()], "speaker": ["female_young"],
                                        "emotion": ["happy"]}), params={"max_reply_seconds": 0.5})
    assert reply["sample_rate"][0] == 16000 and 0 < len(reply["audio"][0]) <= 8000
    bundle = load_bundle("models:/telugu-s2s@champion")
    from dataclasses import replace

    from serving.bundle import recorded_sampling
    from serving.session import GenerationSettings, ReplySession

    assert recorded_sampling(bundle.meta), "the train flow chose sampling settings on the validation split"
    chosen = GenerationSettings.from_params(load_params("smoke").serving, recorded_sampling(bundle.meta))
    same = ReplySession(bundle, "female_young", "happy", replace(chosen, max_reply_seconds=0.5), seed=0)
    assert np.allclose(same.reply(speech), reply["audio"][0], atol=1e-6)
    assert reply["text"][0] == same.reply_text, "the pyfunc returns the text the reply spoke"
    assert bundle.codec.config.n_codebooks == TINY["codec"]["n_codebooks"]
    from serving.bundle import BundleError

    with pytest.raises(BundleError, match="cannot load models:/telugu-s2s@nobody"):
        load_bundle("models:/telugu-s2s@nobody")

    # a re-run with nothing changed trains nothing and registers nothing new
    again = train_flow(profile="smoke", overrides=TINY, thresholds=LENIENT)
    assert again["cached"] == ["codec", "s2s"] and again["reused"] and again["version"] == "1"
    assert again["quality"]["sets"] == result["quality"]["sets"], "the quality report is reused, not re-measured"
    assert len(client.search_model_versions("name = 'telugu-s2s'")) == 1


def test_a_bad_candidate_is_refused_and_never_registered(tiny_corpus: Path, project_root: Path, prefect_harness,
                                                         one_thread):
    from flows.train_flow import train_flow
    from tasks.evaluation.gates import GateFailed

    strict = {**LENIENT, "codec": {**LENIENT["codec"], "min_stoi": 0.99}}
    with pytest.raises(GateFailed, match=r"codec gate failed: stoi .* misses >= 0.99"):
        train_flow(profile="smoke", overrides=TINY, thresholds=strict)

    client = _client(project_root)
    runs = client.search_runs([client.get_experiment_by_name("telugu-s2s").experiment_id],
                              "tags.stage = 'train'")
    [run] = runs
    assert run.info.status == "FAILED" and run.data.tags["rejected_by"] == "codec"
    assert "stoi" in run.data.tags["rejection_reason"] and run.data.tags["gate.codec"] == "failed"
    assert client.search_model_versions("name = 'telugu-s2s'") == []
    assert not (project_root / "artifacts" / "s2s" / "result.json").exists(), "stopped before S2S training"


def test_signoff_needs_every_required_role_before_champion(tiny_corpus: Path, project_root: Path, prefect_harness,
                                                           one_thread):
    from flows.train_flow import train_flow
    from tasks.release import signoff

    manual = {**TINY, "registry": {"auto_promote": False, "required_roles": ["technical_lead", "project_manager"]}}
    result = train_flow(profile="smoke", overrides=manual, thresholds=LENIENT)
    assert result["aliases"] == ["challenger"], "no champion without sign-off"
    params = load_params("smoke", manual)

    markdown, path = signoff.publish_report(params, prefect=True)
    assert path.is_file() and "| Codec SNR > 30 dB | >= 30 |" in markdown
    perplexity = result["metrics"]["s2s"]["perplexity"]
    assert f"| S2S perplexity < 10 | <= 10 | {perplexity:.4g} |" in markdown
    mos = result["metrics"]["quality"]["replies.distillmos"]
    assert "| MOS > 4.0 | >= 4 | — | — not measured |" in markdown, "DNSMOS was not run: no figure, no tick"
    assert f"| DistillMOS | {mos:.2f} |" in markdown and "## Quality" in markdown
    assert "| technical_lead | pending |" in markdown

    with pytest.raises(ValueError, match="unknown role 'cto'"):
        signoff.approve(params, "cto", "Ravi")
    first = signoff.approve(params, "technical_lead", "Lakshmi")
    assert not first["promoted"] and first["missing"] == ["project_manager"]
    second = signoff.approve(params, "project_manager", "Ravi")
    assert second["promoted"]
    client = _client(project_root)
    assert str(client.get_model_version_by_alias("telugu-s2s", "champion").version) == result["version"]
    markdown, _ = signoff.publish_report(params, prefect=False)
    assert "| technical_lead | Lakshmi |" in markdown and "| project_manager | Ravi |" in markdown
    from typer.testing import CliRunner

    from s2s.cli import app

    refused = CliRunner().invoke(app, ["signoff", "approve", "--role", "cto", "--name", "X"])
    assert refused.exit_code == 2 and "unknown role 'cto'" in refused.output
    shown = CliRunner().invoke(app, ["signoff", "report", "--no-prefect", *cli_sets(manual)])
    assert shown.exit_code == 0 and "# Sign-off: telugu-s2s version 1" in shown.output
    run_artifacts = {a.path for a in client.list_artifacts(client.get_model_version("telugu-s2s", "1").run_id,
                                                           "signoff")}
    assert "signoff/report-v1.md" in run_artifacts
    # inference cost and the peer comparison (no load test here: the fallback capacity, its source named)
    assert "## Inference cost" in shown.output and "params.yaml inference_cost.fallback" in shown.output
    assert "## Comparison with published peers" in shown.output and "https://arxiv.org/abs/2409.06666" in shown.output
    summary = CliRunner().invoke(app, ["signoff", "summary", "--out", str(project_root / "EXECUTIVE_SUMMARY.md"),
                                       *cli_sets(manual)])
    assert summary.exit_code == 0, summary.output
    written = (project_root / "EXECUTIVE_SUMMARY.md").read_text()
    assert written.startswith("# Executive summary: telugu-s2s version 1") and "Every required role approved." in written
    run_artifacts = {a.path for a in client.list_artifacts(client.get_model_version("telugu-s2s", "1").run_id,
                                                           "signoff")}
    assert "signoff/executive-summary-v1.md" in run_artifacts
    # rollback: only to a version that was champion once, and with a reason
    never = CliRunner().invoke(app, ["signoff", "rollback", "--to", "1", "--why", " ", *cli_sets(manual)])
    assert never.exit_code == 2 and "say why" in never.output
    back = CliRunner().invoke(app, ["signoff", "rollback", "--to", "1", "--why", "drill", *cli_sets(manual)])
    assert back.exit_code == 0 and "champion is now version 1" in back.output, back.output

    # `s2s eval` on a registered version: the same model, evaluators and settings reuse the report
    evaluated = CliRunner().invoke(app, ["eval", "--model", "1", *cli_sets(manual)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "DistillMOS" in evaluated.output and "recorded on telugu-s2s version 1" in evaluated.output
    assert "(reused: same model, evaluators and settings)" in evaluated.output
    tags = client.get_model_version("telugu-s2s", "1").tags
    assert client.get_run(tags["quality_run_id"]).data.tags["stage"] == "quality"
    assert float(tags["quality.replies.distillmos"]) == pytest.approx(mos, rel=1e-3)
    missing = CliRunner().invoke(app, ["eval", "--model", "7", *cli_sets(manual)])
    assert missing.exit_code == 2 and "telugu-s2s/7" in missing.output


def test_dvc_repro_rebuilds_and_gates_the_model_without_prefect(tiny_corpus: Path, project_root: Path):
    """The real dvc.yaml stages, their commands given the tiny model's settings, run by `dvc repro`."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from .conftest import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())
    lenient = [f"--threshold={g}.{k}={json.dumps(v)}" for g, values in LENIENT.items() for k, v in values.items()]
    for name in ("codec", "s2s", "gates", "quality"):
        stage = stages["stages"][name]
        assert stage["cmd"].startswith("s2s "), "stages call the task CLIs"
        stage["cmd"] = " ".join([stage["cmd"], *cli_sets(TINY), *(lenient if name in ("gates", "quality") else [])])
    (project_root / "dvc.yaml").write_text(yaml.safe_dump(stages))
    for folder in ("core", "models", "tasks", "serving"):
        (project_root / folder).symlink_to(REPO / folder)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=project_root, check=True, env=env)
    first = subprocess.run([*dvc, "repro", "quality"], cwd=project_root, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((project_root / "artifacts" / "gates.json").read_text())
    assert report["passed"] and set(report["gates"]) == {"codec", "s2s", "latency"}
    assert (project_root / "artifacts" / "bundle" / "bundle.json").is_file()
    quality = json.loads((project_root / "artifacts" / "quality.json").read_text())
    assert quality["gate"]["passed"] and quality["sets"]["replies"]["items"] == 12  # 9 emotions + 3 other speakers
    assert 0 <= quality["sets"]["corpus"]["cer"] and quality["sets"]["corpus"]["distillmos"] > 1

    again = subprocess.run([*dvc, "repro", "quality"], cwd=project_root, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout, again.stdout[-2000:]
