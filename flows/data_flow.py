"""The data flow: sources -> download -> normalize -> segment -> quality -> splits -> pairs -> DVC.

Re-running with unchanged inputs redoes nothing, by content rather than by Prefect's result
cache: yt-dlp's download archive skips fetched items, normalization and segmentation keep a
stamp (hash of input file and settings) beside each output, the corpus folder is rebuilt only
when the fingerprint of everything it is made from changes, and `dvc add` of an unchanged
folder is a no-op. The same holds when the task CLIs or `dvc repro` run the steps without
Prefect, which a Prefect result cache would not give. Tasks therefore use NO_CACHE.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from core.config import Params, load_params
from flows.one_writer import holds_writer_slot
from flows.workspace import exclusive
from tasks.data import (corpus, digests, download, normalize, pairs, segment_checks, segment, splits, synth_corpus,
                        transcripts, version)
from tasks.data.sources import Source, load_sources


@task(name="synthesize-embedded-corpus", cache_policy=NO_CACHE)
def synthesize_task(params: Params) -> Path:
    return synth_corpus.synthesize(params)


@task(name="download", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def download_task(sources: list[Source], params: Params) -> download.DownloadReport:
    cfg = params.download
    return download.download_sources(sources, cfg, params.path(cfg.out_dir), params.path(cfg.archive))


@task(name="normalize", cache_policy=NO_CACHE)
def normalize_task(recordings: list[download.Recording], params: Params):
    return normalize.normalize_all(recordings, params.normalize, params.path(params.normalize.out_dir),
                                   params.quality.frame_ms)


@task(name="segment", cache_policy=NO_CACHE)
def segment_task(recordings: list[normalize.NormalizedRecording], sources: list[Source], params: Params):
    diarizer = None
    if params.segment.backend == "pyannote":
        from tasks.data.diarize_pyannote import load_diarizer

        diarizer = load_diarizer(params.segment.pyannote_pipeline)
    return segment.segment_all(recordings, {s.id: s for s in sources}, params.segment,
                               params.path(params.segment.out_dir), diarizer)


@task(name="quality-checks", cache_policy=NO_CACHE)
def quality_task(manifest: pd.DataFrame, params: Params) -> segment_checks.QualityResult:
    return segment_checks.check_quality(manifest, params.quality, params.segment)


@task(name="build-corpus", cache_policy=NO_CACHE)
def build_task(params: Params, result: segment_checks.QualityResult, failures: dict, normalized: list,
               fingerprint: str) -> corpus.CorpusSummary:
    kept = result.kept.copy()
    split_map = splits.split_sources(sorted(set(kept["source_id"]) | set(result.quarantined["source_id"])),
                                     params.splits.seed, params.splits.val_fraction, params.splits.test_fraction)
    split_of = {sid: name for name, ids in split_map.items() for sid in ids}
    kept["split"] = kept["source_id"].map(split_of)
    quarantined = result.quarantined.assign(split=result.quarantined["source_id"].map(split_of))
    pair_rows = pairs.make_pairs(kept, params.pairs.max_gap_s, params.pairs.default_emotion)
    return corpus.build_corpus(
        params.path(params.paths.data), kept, quarantined, failures, split_map, pair_rows, result.report,
        {r.recording_id: str(r.wav_path) for r in normalized},
        hours_in=sum(r.duration_s for r in normalized) / 3600, recordings=len(normalized) + len(failures),
        input_fingerprint=fingerprint,
    )


@task(name="version-corpus", cache_policy=NO_CACHE)
def version_task(params: Params) -> version.CorpusVersion:
    cfg = params.version
    return version.version_corpus(params.root, params.path(params.paths.data), cfg.push, cfg.remote_name,
                                  cfg.remote_url)


def validation_rows(validation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per expectation of both GX suites: what was checked and how many rows failed."""
    rows = []
    for suite in ("segment_quality", "corpus_table"):
        for result in validation.get(suite, {}).get("results", []):
            config = result["expectation_config"]
            rows.append({"suite": suite, "expectation": config["type"], "column": config["kwargs"].get("column"),
                         "success": result["success"], "unexpected": result["result"].get("unexpected_count", 0)})
    return rows


def warn_if_digests_differ(params: Params, data_dir: Path) -> None:
    """Name the corpus files that differ from the committed data.digests, when there is one: a
    changed data.dvc then says which files changed (inputs changed, or a machine computed
    otherwise), instead of one hash for 86 MB."""
    listing = params.root / digests.DIGESTS_FILE
    if not listing.is_file():
        return
    differences = digests.compare(digests.read(listing), digests.tree_digests(data_dir))
    if differences:
        tools = digests.version_differences(listing)
        get_run_logger().warning(
            "the corpus differs from %s in %d files (%s%s)%s; if the inputs changed on purpose, run "
            "`s2s corpus digests --write` and commit it with data.dvc", listing.name, len(differences),
            "; ".join(differences[:5]), "; ..." if len(differences) > 5 else "",
            f"; tools differ: {'; '.join(tools)}" if tools else "")


@flow(name="data", log_prints=True)
@holds_writer_slot
@exclusive("data flow")
def data_flow(profile: str = "smoke", sources_file: str | None = None,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the versioned, quality-checked corpus from the sources and return its summary."""
    started = time.monotonic()
    logger = get_run_logger()
    params = load_params(profile, overrides)
    embedded = params.path(params.paths.sources_file)
    path = Path(sources_file).expanduser().resolve() if sources_file else embedded
    if path == embedded.resolve():
        synthesize_task(params)  # deterministic and cheap: byte-identical when nothing changed
    sources = load_sources(path)

    report = download_task(sources, params)
    failures = {f"{f.source_id}@{f.url}": {"source_id": f.source_id, "code": "download_failed", "error": f.error}
                for f in report.failures}
    for failure in report.failures:
        logger.error("download failed for source %s: %s", failure.source_id, failure.error)
    normalized, norm_failures = normalize_task(report.recordings, params)
    rows, seg_failures = segment_task(normalized, sources, params)
    failures |= norm_failures | seg_failures
    for rid, failure in (norm_failures | seg_failures).items():
        logger.error("recording %s refused: %s", rid, failure["error"])

    rows = transcripts.attach_text(rows, sources, path)
    manifest = pd.DataFrame(rows)
    if manifest.empty:
        raise RuntimeError(f"no segments from {len(sources)} sources: every item failed ({len(failures)} failures)")
    manifest["emotion"] = manifest["emotion"].fillna(params.pairs.default_emotion)
    fingerprint = corpus.fingerprint({
        "rows": rows, "failures": failures, "splits": params.splits.model_dump(), "pairs": params.pairs.model_dump(),
        "quality": params.quality.model_dump(mode="json"), "format": 3,  # 2: no GX random ids/times in validation.json; 3: text column
    })
    data_dir = params.path(params.paths.data)
    summary = corpus.existing_summary(data_dir, fingerprint)
    if summary is None:
        result = quality_task(manifest, params)
        summary = build_task(params, result, failures, normalized, fingerprint)
    else:
        logger.info("corpus unchanged (fingerprint %s...): not rebuilt", fingerprint[:12])
    if params.version.enabled:
        summary.corpus_hash = version_task(params).corpus_hash
    warn_if_digests_differ(params, data_dir)

    summary.extra["seconds"] = round(time.monotonic() - started, 1)
    create_markdown_artifact(key="data-summary", markdown=corpus.summary_markdown(summary),
                             description="Corpus built by the data flow")
    validation = json.loads((data_dir / "reports" / "validation.json").read_text())
    create_table_artifact(key="data-validation", description="Great Expectations results over the manifest",
                          table=validation_rows(validation))
    create_table_artifact(key="data-quarantine", description="Quarantined segments by reason",
                          table=[{"reason": k, "count": v} for k, v in summary.quarantine_reasons.items()] or
                          [{"reason": "none", "count": 0}])
    return asdict(summary)
