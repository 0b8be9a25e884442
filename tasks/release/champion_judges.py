"""A champion measured by other judges is measured again before a challenger is compared with it.

Promotion compares a figure only when the same judge's weights measured both sides
(tasks/release/promotion.py). When a judge is retrained (a new corpus, new judge settings, a
profile with its own judges), every judged figure of the champion becomes "other judge" and holds
every challenger back until someone runs `s2s eval --model champion` by hand. The train flow calls
`reevaluate_champion` before it registers: the champion's own bundle is evaluated by the
candidate's judges (with its own recorded sampling, on the same test turns) and its tags are
rewritten, so the comparison that decides promotion, and the sign-off report, are like for like.
"""

from __future__ import annotations

import logging
from typing import Any

from core.config import Params
from core.tracking import tracking_uri
from serving.bundle import bundle_sha, download_bundle, load_bundle_dir
from tasks.evaluation.model_quality import evaluate_quality, record_on_version
from tasks.release.promotion import judges_from_tags, other_judges
from tasks.release.registry import CHAMPION, mlflow_client

log = logging.getLogger(__name__)


def reevaluate_champion(params: Params, judges: dict[str, str], parent_run_id: str | None = None) -> dict[str, Any]:
    """Evaluate the champion again with `judges` ({"asr": run id, ...}, the candidate's) when its
    figures were measured by others. Returns what happened: {"version", "judges" (those that
    differed), "reevaluated"}; a failure is logged and returned ("error"), never raised, since the
    comparison then only holds promotion back, as it would have without this step."""
    from mlflow.exceptions import MlflowException

    name = params.registry.model_name
    client = mlflow_client(params)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet: nothing to compare with
        return {"version": None, "judges": [], "reevaluated": False}
    version = str(champion.version)
    differ = other_judges(judges, judges_from_tags(champion.tags))
    if not differ:
        return {"version": version, "judges": [], "reevaluated": False}
    log.info("champion version %s was measured by other %s judges: evaluating it again with the candidate's",
             version, "/".join(differ))
    try:
        bundle_dir = download_bundle(f"models:/{name}/{version}", tracking_uri(params.root, params.mlflow.tracking_uri))
        report = evaluate_quality(load_bundle_dir(bundle_dir), params, bundle_sha(bundle_dir), parent_run_id)
        record_on_version(params, version, report)
    except Exception as exc:  # noqa: BLE001 - an old champion that cannot be evaluated must not stop a release
        log.warning("could not evaluate champion version %s again (%s: %s): its figures stay 'other judge'",
                    version, type(exc).__name__, exc)
        return {"version": version, "judges": differ, "reevaluated": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"version": version, "judges": differ, "reevaluated": True, "quality_run_id": report.get("run_id")}
