"""The MLflow model registry: one registered model, codec and S2S together, with aliases.

    challenger   the latest candidate that passed every gate
    champion     the candidate the server loads: set after sign-off by the roles params.yaml
                 names, or at once when the profile says auto_promote and the candidate is not
                 worse than the current champion on the figures users hear (promotion.py; the
                 comparison is kept on the version as the `promotion` tag either way)

A version carries what a reviewer needs as tags (gates, key metrics, corpus hash, git commit,
profile, cost) and the full evaluation as a JSON artifact of its run. Registering the same
weights again (a re-run with nothing changed) returns the existing version instead of a copy.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import core
import models
import serving
from core.config import Params
from core.tracking import tracking_uri
from serving.bundle import bundle_sha, read_meta, recorded_sampling
from serving.pyfunc import TeluS2SModel
from serving.turns import GenerationSettings
from tasks.release.promotion import PromotionDecision, compare_with_champion, figures_from_tags, judges_from_tags
from tasks.training.tracker import use_experiment

CHALLENGER, CHAMPION = "challenger", "champion"
PROMOTION_TAG = "promotion"
REQUIREMENTS = ("torch", "torchaudio", "numpy", "pandas", "soundfile", "pyyaml", "pydantic", "mlflow")


@dataclass
class RegisteredVersion:
    name: str
    version: str
    aliases: list[str]
    run_id: str
    reused: bool

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def mlflow_client(params: Params):
    """An MlflowClient on the project's store (MLFLOW_TRACKING_URI wins)."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(params.root, params.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _requirements() -> list[str]:
    pins = []
    for package in REQUIREMENTS:
        try:
            pins.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(package)
    return pins


def find_version(client: Any, name: str, sha: str, sampling: str) -> Any | None:
    """The version of `name` holding exactly these weights with these recorded sampling settings
    (`sampling_key`), if one was registered. The settings are part of what serving does with the
    weights, so a new choice (another search, other candidates) is a new version; one registered
    before the `sampling` tag existed has unknown settings and is not reused."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tag.bundle_sha = '{sha}'")
    except Exception:  # the registered model does not exist yet
        return None
    found = [v for v in found if v.tags.get(SAMPLING_TAG) == sampling]
    return max(found, key=lambda v: int(v.version)) if found else None


def sampling_key(meta: dict[str, Any]) -> str:
    """The sampling settings a bundle records (chosen on the validation split), as the registry's tag."""
    return json.dumps(recorded_sampling(meta), sort_keys=True)


SAMPLING_TAG = "sampling"
REGISTERED_TAG = "registration"  # "complete" once every tag and alias of a version is set


def register_bundle(bundle_dir: Path, params: Params, evaluation: dict[str, Any], tags: dict[str, str],
                    parent_run_id: str | None = None) -> RegisteredVersion:
    """Register a candidate that passed its gates: log the pyfunc model in a `register` run, tag
    the version, alias it challenger (and champion when the profile auto-promotes).

    Safe against a kill at any point (tests/test_chaos.py): the version is created with its
    bundle_sha and sampling tags in one store transaction, so a rerun always finds it and never
    registers the same weights with the same sampling settings twice; its other tags and aliases are set after, and a version a kill left
    without `registration=complete` is finished by the rerun instead of being returned half-tagged."""
    import mlflow

    name = params.registry.model_name
    client = mlflow_client(params)
    sha, sampling = bundle_sha(bundle_dir), sampling_key(read_meta(bundle_dir))
    existing = find_version(client, name, sha, sampling)
    if existing is not None:
        current = client.get_model_version(name, existing.version)
        legacy = REGISTERED_TAG not in current.tags and PROMOTION_TAG in current.tags  # registered before the tag
        if current.tags.get(REGISTERED_TAG) == "complete" or legacy:
            record_newer_quality(params, str(current.version), dict(current.tags), evaluation)
            return RegisteredVersion(name, str(current.version), list(current.aliases or []), current.run_id,
                                     reused=True)
        aliases = _finish_registration(client, params, name, str(current.version), sha, evaluation, tags)
        return RegisteredVersion(name, str(current.version), aliases, current.run_id, reused=True)

    use_experiment(params.root, params.mlflow.tracking_uri, params.mlflow.experiment)
    run_tags = {**tags, "stage": "register", **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    with mlflow.start_run(run_name="register", tags=run_tags, nested=mlflow.active_run() is not None) as run:
        mlflow.log_dict(evaluation, "evaluation.json")
        mlflow.log_metrics(flat_metrics(evaluation))
        # The pyfunc needs only the layers below tasks/: the base, the models and serving.
        code = [str(Path(m.__file__).parent) for m in (core, models, serving)]
        info = mlflow.pyfunc.log_model(name="model", python_model=TeluS2SModel(),
                                       artifacts={"bundle": str(bundle_dir)}, code_paths=code,
                                       signature=pyfunc_signature(params, recorded_sampling(read_meta(bundle_dir))),
                                       pip_requirements=_requirements())
        version = str(mlflow.register_model(info.model_uri, name,
                                            tags={"bundle_sha": sha, SAMPLING_TAG: sampling}).version)
    aliases = _finish_registration(client, params, name, version, sha, evaluation, tags)
    return RegisteredVersion(name, version, aliases, run.info.run_id, reused=False)


def _finish_registration(client: Any, params: Params, name: str, version: str, sha: str,
                         evaluation: dict[str, Any], tags: dict[str, str]) -> list[str]:
    """Tags, description and aliases of a created version (idempotent: a rerun repeats them)."""
    client.update_registered_model(name, description=(
        "Telugu speech-to-speech: TeluCodec + S2S transformer. Aliases: challenger = latest candidate that passed "
        "the gates; champion = signed off (or auto-promoted) and served."))
    version_tags = {**tags, "bundle_sha": sha, "gates_passed": str(all(g["passed"] for g in evaluation["gates"].values())).lower(),
                    **{f"gate.{g}": "passed" if r["passed"] else "failed" for g, r in evaluation["gates"].items()},
                    **{k: f"{v:.4g}" for k, v in flat_metrics(evaluation).items()}}
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.update_model_version(name, version, description=version_description(name, version, evaluation, tags))
    client.set_registered_model_alias(name, CHALLENGER, version)
    aliases = [CHALLENGER]
    decision = champion_comparison(client, name, flat_metrics(evaluation), judges_from_tags(tags))
    client.set_model_version_tag(name, version, PROMOTION_TAG, json.dumps(decision.to_dict()))
    if params.registry.auto_promote and decision.promote:
        promote(client, name, version, f"auto-promote (profile {params.profile}): {decision.reason}")
        aliases.append(CHAMPION)
    client.set_model_version_tag(name, version, REGISTERED_TAG, "complete")
    return aliases


def version_description(name: str, version: str, evaluation: dict[str, Any], tags: dict[str, str]) -> str:
    """The version page's description in the MLflow UI: what it is, its figures, how to load it."""
    metrics = flat_metrics(evaluation)
    shown = [("codec STOI", "codec.stoi", "{:.3f}"), ("codec PESQ-WB", "codec.pesq_wb", "{:.2f}"),
             ("S2S validation cross-entropy (nats)", "s2s.cross_entropy", "{:.2f}"),
             ("first audio mean / p95 (ms)", "latency.first_audio_mean_ms", "{:.1f}"),
             ("", "latency.first_audio_p95_ms", "{:.1f}"), ("training cost (USD)", "cost.total_usd", "{:.2f}")]
    figures = []
    for label, key, fmt in shown:
        if key in metrics:
            text = fmt.format(metrics[key])
            if label:
                figures.append(f"- {label}: {text}")
            else:
                figures[-1] += f" / {text}" if figures else ""
    gates = ", ".join(f"{g} {'passed' if r['passed'] else 'FAILED'}" for g, r in evaluation.get("gates", {}).items())
    return "\n".join([
        f"Telugu speech-to-speech model (TeluCodec + S2S transformer), profile {tags.get('profile', '?')}, "
        f"git {tags.get('git_commit', '?')}, corpus {tags.get('corpus_hash', '?')}.", "",
        f"Gates: {gates or 'none recorded'}.", "", "Figures at registration:", *(figures or ["- none recorded"]), "",
        "Quality (MOS, CER, emotion and speaker control) is in the quality.* tags and the sign-off report "
        f"(`s2s signoff report --version {version}`).", "",
        "Load it:",
        f"- whole turns: `mlflow.pyfunc.load_model(\"models:/{name}/{version}\")` (input: audio, speaker, emotion)",
        f"- streaming: `serving.bundle.load_bundle(\"models:/{name}/{version}\")`",
        f"- serve it: `s2s serve --model models:/{name}/{version}`"])


def pyfunc_signature(params: Params, recorded: dict[str, Any] | None = None) -> Any:
    """What the pyfunc takes and gives, with the generation settings as parameters (defaults: what
    serving would use, the model's validation-chosen sampling included): without params in its
    signature MLflow drops them at predict."""
    import pandas as pd
    from mlflow.models import infer_signature

    chosen = GenerationSettings.from_params(params.serving, recorded)
    settings = {"temperature": chosen.temperature, "top_k": chosen.top_k or 0,
                "max_reply_seconds": chosen.max_reply_seconds, "max_utterance_seconds": chosen.max_utterance_seconds,
                "min_reply_seconds": chosen.min_reply_seconds, "guidance": chosen.guidance}
    example_in = pd.DataFrame({"audio": [[0.0, 0.1]], "speaker": ["female_young"], "emotion": ["neutral"]})
    example_out = pd.DataFrame({"audio": [[0.0, 0.1]], "sample_rate": [16000], "text": ["అవును"]})
    return infer_signature(example_in, example_out, params=settings)


def champion_comparison(client: Any, name: str, figures: dict[str, float],
                        judges: dict[str, str] | None = None) -> PromotionDecision:
    """The candidate's figures beside the current champion's (from its tags); no champion: promote.
    `judges`: the candidate's judges' run ids, checked against those that measured the champion."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # the alias is not set yet
        return compare_with_champion(figures, None, None)
    return compare_with_champion(figures, figures_from_tags(champion.tags), str(champion.version), judges,
                                 judges_from_tags(champion.tags))


def flat_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """codec.snr_db, s2s.perplexity, latency.first_audio_mean_ms, ... from the evaluation."""
    return {f"{stage}.{key}": float(value) for stage, values in evaluation.get("metrics", {}).items()
            for key, value in values.items() if isinstance(value, (int, float))}


def promote(client: Any, name: str, version: str, why: str) -> None:
    """Make `version` the champion; refuses a version whose gates did not all pass."""
    tags = client.get_model_version(name, version).tags
    if tags.get("gates_passed") != "true":
        raise PermissionError(f"{name} version {version} did not pass its gates: it cannot become {CHAMPION}")
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promoted", why)


def rollback(client: Any, name: str, version: str, why: str) -> str | None:
    """Make an earlier champion the champion again (after a bad release); returns the version it
    replaces. Refuses a version that never was champion: a new version gets there by sign-off."""
    from mlflow.exceptions import MlflowException

    if not why.strip():
        raise ValueError("say why: --why \"...\" is recorded on the version")
    tags = client.get_model_version(name, version).tags
    if not tags.get("promoted"):
        raise PermissionError(f"{name} version {version} was never {CHAMPION}: promote a new version by sign-off "
                              "(`s2s signoff approve`), not by rollback")
    try:
        current = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        current = None
    promote(client, name, version, f"rollback from version {current}: {why.strip()}")
    if current and current != str(version):
        client.set_model_version_tag(name, current, "rolled_back", f"replaced by version {version}: {why.strip()}")
    return current


def record_newer_quality(params: Params, version: str, version_tags: dict[str, str],
                         evaluation: dict[str, Any]) -> bool:
    """The same weights and sampling evaluated again (other judges, more draws): the version's
    figures become this evaluation's, so promotion and its sign-off report read the latest
    measurement rather than the one made when it was registered. True when the tags changed."""
    run_id = str((evaluation.get("runs") or {}).get("quality"))
    if "quality" not in evaluation or run_id == "None" or version_tags.get("quality_run_id") == run_id:
        return False
    from tasks.evaluation.model_quality import record_on_version

    record_on_version(params, version, {**evaluation["quality"], "run_id": run_id})
    return True


def version_info(client: Any, name: str, version: str) -> dict[str, Any]:
    """A version's tags, aliases, run and evaluation.json: what the sign-off report shows."""
    mv = client.get_model_version(name, version)
    evaluation: dict[str, Any] = {}
    try:
        path = client.download_artifacts(mv.run_id, "evaluation.json", tempfile.mkdtemp(prefix="s2s-eval-"))
        evaluation = json.loads(Path(path).read_text())
    except Exception:  # an older version without the artifact: the tags still say enough
        evaluation = {}
    latest = mv.tags.get("quality_run_id", "None")
    if latest != "None" and str((evaluation.get("runs") or {}).get("quality")) != latest:
        try:  # measured after registration (`s2s eval`, the champion's re-evaluation, a rerun): the latest wins
            from tasks.evaluation.model_quality import flat_metrics

            path = client.download_artifacts(latest, "quality.json", tempfile.mkdtemp(prefix="s2s-quality-"))
            evaluation["quality"] = json.loads(Path(path).read_text())
            evaluation.setdefault("runs", {})["quality"] = latest
            evaluation.setdefault("metrics", {})["quality"] = flat_metrics(evaluation["quality"])
        except Exception:  # the run or its artifact is gone: the quality.* tags (the latest) still say enough
            evaluation.pop("quality", None)
            evaluation.get("metrics", {}).pop("quality", None)
    aliases = [a for a, v in (client.get_registered_model(name).aliases or {}).items() if str(v) == str(version)]
    return {"name": name, "version": str(version), "tags": dict(mv.tags), "run_id": mv.run_id, "aliases": aliases,
            "created": mv.creation_timestamp, "evaluation": evaluation}
