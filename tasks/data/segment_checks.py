"""Quality gate over the segment manifest: a Great Expectations suite decides, nothing is dropped.

The suite holds one expectation per quality rule (duration, level as recorded, SNR, clipping,
silence) with thresholds from params.yaml, plus table rules (unique ids, checklist speakers and
emotions, no missing values). It is run over the manifest of every segment with COMPLETE
results, and each segment an expectation rejects is quarantined with a reason that names the
rule and the measured value ("snr_db 3.2 below 10.0"). The table rules must then hold on the
kept segments, or the corpus is refused. The validation result is kept as a JSON report.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from core.config import QualityConfig, SegmentConfig
from core.labels import EMOTIONS, SPEAKERS

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

# column -> (reason code, bound kind); bound kind is "min", "max" or "range"
METRIC_RULES: dict[str, str] = {
    "duration_s": "duration",
    "raw_dbfs": "too_quiet",
    "snr_db": "low_snr",
    "clipping_ratio": "clipping",
    "silence_ratio": "too_much_silence",
}


class CorpusValidationError(RuntimeError):
    """The kept corpus breaks a table rule (duplicate ids, unknown labels): a bug upstream."""


@dataclass
class QualityResult:
    kept: pd.DataFrame
    quarantined: pd.DataFrame
    report: dict[str, Any]
    reasons: Counter = field(default_factory=Counter)


def _expectations(gx: Any, quality: QualityConfig, segment: SegmentConfig, rows: bool, table: bool) -> list[Any]:
    E = gx.expectations
    expectations: list[Any] = []
    if rows:
        bounds = {
            "duration_s": {"min_value": segment.min_segment_s, "max_value": segment.max_segment_s},
            "raw_dbfs": {"min_value": quality.min_raw_dbfs},
            "snr_db": {"min_value": quality.min_snr_db},
            "clipping_ratio": {"max_value": quality.max_clipping_ratio},
            "silence_ratio": {"max_value": quality.max_silence_ratio},
        }
        for column, kwargs in bounds.items():
            expectations.append(E.ExpectColumnValuesToBeBetween(
                column=column, **kwargs, meta={"reason": METRIC_RULES[column]}))
    if table:
        expectations.append(E.ExpectColumnValuesToBeUnique(column="segment_id"))
        for column in ("segment_id", "recording_id", "source_id", "speaker", "emotion", "start", "end"):
            expectations.append(E.ExpectColumnValuesToNotBeNull(column=column))
        expectations.append(E.ExpectColumnValuesToBeInSet(column="speaker", value_set=list(SPEAKERS)))
        expectations.append(E.ExpectColumnValuesToBeInSet(column="emotion", value_set=list(EMOTIONS)))
    return expectations


def _validate(frame: pd.DataFrame, name: str, expectations: list[Any]) -> Any:
    """Run one suite over a DataFrame in an ephemeral GX context (nothing written to disk)."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    asset = context.data_sources.add_pandas("corpus").add_dataframe_asset("segments")
    batch_definition = asset.add_batch_definition_whole_dataframe("manifest")
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for expectation in expectations:
        suite.add_expectation(expectation)
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=suite))
    return validation.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["segment_id"]},
    )


def _bound_text(kwargs: dict[str, Any]) -> str:
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is not None and hi is not None:
        return f"outside [{lo}, {hi}]"
    return f"below {lo}" if lo is not None else f"above {hi}"


def check_quality(manifest: pd.DataFrame, quality: QualityConfig, segment: SegmentConfig) -> QualityResult:
    """Validate every segment; return kept and quarantined rows (with reasons) and the report."""
    import great_expectations as gx

    if manifest.empty:
        empty = manifest.assign(reason=pd.Series(dtype=str))
        return QualityResult(manifest, empty, {"success": False, "note": "no segments to validate"})
    frame = manifest.reset_index(drop=True)
    row_result = _validate(frame, "segment_quality", _expectations(gx, quality, segment, rows=True, table=False))
    reasons: dict[str, list[str]] = {}
    codes: dict[str, list[str]] = {}
    values = frame.set_index("segment_id")
    for result in row_result.results:
        config = result.expectation_config
        column = config.kwargs["column"]
        for item in result.result.get("unexpected_index_list") or []:
            sid = item["segment_id"]
            value = values.at[sid, column]
            reasons.setdefault(sid, []).append(f"{column} {value:g} {_bound_text(config.kwargs)}")
            codes.setdefault(sid, []).append(config.meta["reason"])
    bad = frame["segment_id"].isin(reasons)
    quarantined = frame[bad].copy()
    quarantined["reason"] = [", ".join(reasons[s]) for s in quarantined["segment_id"]]
    quarantined["reason_code"] = [codes[s][0] for s in quarantined["segment_id"]]
    kept = frame[~bad].copy()

    table_result = _validate(kept, "corpus_table", _expectations(gx, quality, segment, rows=False, table=True))
    if not table_result.success:
        broken = [f"{r.expectation_config.type}({r.expectation_config.kwargs.get('column')})"
                  for r in table_result.results if not r.success]
        raise CorpusValidationError(f"kept segments break table rules: {', '.join(broken)}")
    report = {
        "segments": len(frame),
        "kept": len(kept),
        "quarantined": len(quarantined),
        "quarantine_reasons": dict(Counter(c for s in codes.values() for c in s)),
        "segment_quality": row_result.to_json_dict(),
        "corpus_table": table_result.to_json_dict(),
    }
    return QualityResult(kept, quarantined, report, Counter(quarantined["reason_code"]))
