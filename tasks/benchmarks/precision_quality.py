"""`s2s bench precision`: whether the model's quality holds at a reduced serving precision.

The project's quality evaluation (tasks/evaluation/model_quality.py: the same judges, corpus
clips and reply requests) is run on the same bundle twice, as loaded (fp32) and through
serving.precision.with_precision, and the figures are set side by side with their difference.
Replies are sampled, so a small set differs by sampling noise too: the fp32 run is the yardstick
for how large that is (run it with a larger evaluation.reply_inputs to narrow it).
"""

from __future__ import annotations

from typing import Any

from serving.bundle import ModelBundle
from serving.precision import with_precision


def compare_precision(bundle: ModelBundle, params: Any, bundle_id: str, precision: str = "int8") -> dict[str, Any]:
    """{"fp32": figures, precision: figures, "rows": [[set.figure, fp32, other, other - fp32], ...]}."""
    from tasks.evaluation.model_quality import evaluate_quality, flat_metrics

    reports = {}
    for name, candidate in (("fp32", bundle), (precision, with_precision(bundle, precision))):
        report = evaluate_quality(candidate, params, f"{bundle_id}-{name}", use_mlflow=False)
        reports[name] = flat_metrics(report)
    rows = [[key, reports["fp32"][key], reports[precision].get(key),
             None if reports[precision].get(key) is None else reports[precision][key] - reports["fp32"][key]]
            for key in sorted(reports["fp32"]) if not key.startswith("corpus.")]
    return {**reports, "precision": precision, "rows": rows}
