"""Evaluation gates: a candidate's measured figures against the profile's thresholds.

A gate is a list of checks, each a figure, a comparison and a threshold; it passes only when
every check does. A figure that was not measured fails its check (a gate never passes on a
missing number). The failing checks, in words, are the reason a candidate was refused: the
train flow writes it to the MLflow run and the Prefect run, and nothing is registered.

The order of the gates is gate_candidate's, the one sequence the train flow and `s2s gates` (the
dvc.yaml stage) both run; they differ only in how each step is carried out (Prefect tasks or plain
calls), which they pass in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.config import CodecGate, LatencyGate, Params, QualityGate, S2SGate


@dataclass(frozen=True)
class Check:
    metric: str
    value: float | None
    op: str  # ">=" or "<="
    threshold: float
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def describe(self) -> str:
        if self.value is None:
            return f"{self.metric} not measured (needs {self.op} {self.threshold:g})"
        verdict = "meets" if self.passed else "misses"
        return f"{self.metric} {self.value:.4g} {verdict} {self.op} {self.threshold:.4g}{f' ({self.note})' if self.note else ''}"


@dataclass
class GateResult:
    name: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def reason(self) -> str:
        """The failing checks in words; empty when the gate passed."""
        return "; ".join(check.describe() for check in self.checks if not check.passed)

    def rows(self) -> list[dict[str, Any]]:
        """One table row per check (Prefect table artifact, sign-off report)."""
        return [{"gate": self.name, "metric": c.metric, "value": None if c.value is None else round(c.value, 4),
                 "rule": f"{c.op} {c.threshold:g}", "passed": c.passed, "note": c.note} for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "reason": self.reason,
                "checks": [{**asdict(c), "passed": c.passed} for c in self.checks]}


class GateFailed(RuntimeError):
    """A candidate refused by a gate; the message is the gate's reason."""

    def __init__(self, result: GateResult) -> None:
        super().__init__(f"{result.name} gate failed: {result.reason}")
        self.result = result


def codec_gate(metrics: dict[str, float], baselines: dict[str, dict[str, float]], cfg: CodecGate) -> GateResult:
    """Test-split codec metrics against floors, then against reference codecs measured on the
    same audio: with beat_baseline, mel distance and STOI (and SNR when it is gated) must beat
    8-bit mu-law PCM at the codec's own bitrate; each codec in beat_codecs (e.g. Codec2 at
    1.6 kbps) must be matched or beaten on STOI and PESQ-wb."""
    planned = [("snr_db", ">=", cfg.min_snr_db), ("si_sdr_db", ">=", cfg.min_si_sdr_db),
               ("mel_distance", "<=", cfg.max_mel_distance), ("stoi", ">=", cfg.min_stoi),
               ("pesq_wb", ">=", cfg.min_pesq_wb)]
    gate = GateResult("codec", [Check(metric, metrics.get(metric), op, threshold)
                                for metric, op, threshold in planned if threshold is not None])
    if cfg.beat_baseline:
        mulaw = baselines.get("mulaw_same_bitrate", {})
        compared = [("mel_distance", "<="), ("stoi", ">=")] + ([("snr_db", ">=")] if cfg.min_snr_db is not None else [])
        for metric, op in compared:
            missing = float("inf") if op == ">=" else float("-inf")  # an unmeasured baseline cannot be beaten
            gate.checks.append(Check(metric, metrics.get(metric), op, mulaw.get(metric, missing),
                                     "mu-law at the same bitrate"))
    for name in cfg.beat_codecs:
        reference = baselines.get(name, {})
        for metric in ("stoi", "pesq_wb"):
            gate.checks.append(Check(metric, metrics.get(metric), ">=", reference.get(metric, float("inf")), name))
    return gate


def s2s_gate(metrics: dict[str, float], codebook_size: int, cfg: S2SGate) -> GateResult:
    """Validation cross-entropy and perplexity, absolute and relative to guessing uniformly; with
    beat_bigram, also below the per-codebook bigram baseline measured on the same split."""
    perplexity = metrics.get("perplexity")
    gate = GateResult("s2s", [
        Check("cross_entropy", metrics.get("cross_entropy"), "<=", cfg.max_cross_entropy),
        Check("perplexity", perplexity, "<=", cfg.max_perplexity),
        Check("perplexity_vs_uniform", None if perplexity is None else perplexity / codebook_size, "<=",
              cfg.max_uniform_ratio, f"uniform = {codebook_size}"),
    ])
    if cfg.beat_bigram:
        gate.checks.append(Check("cross_entropy", metrics.get("cross_entropy"), "<=",
                                 metrics.get("bigram_cross_entropy", float("-inf")), "per-codebook bigram baseline"))
    return gate


def latency_gate(figures: dict[str, float], cfg: LatencyGate) -> GateResult:
    """First-audio latency through the serving path: mean, p95 and its spread; and, where the
    profile sets a floor, the serving capacity the last `s2s loadtest` measured (sessions per
    core). The capacity travels with the latency figures either way (the sign-off quotes it)."""
    gate = GateResult("latency", [
        Check("first_audio_mean_ms", figures.get("first_audio_mean_ms"), "<=", cfg.max_mean_ms),
        Check("first_audio_p95_ms", figures.get("first_audio_p95_ms"), "<=", cfg.max_p95_ms),
        Check("first_audio_std_ms", figures.get("first_audio_std_ms"), "<=", cfg.max_std_ms),
    ])
    if cfg.min_capacity_sessions_per_core is not None:
        gate.checks.append(Check("capacity_sessions_per_core", figures.get("capacity_sessions_per_core"), ">=",
                                 cfg.min_capacity_sessions_per_core,
                                 f"{figures.get('capacity_sessions', 0):g} sessions on "
                                 f"{figures.get('capacity_cores', 0):g} cores, s2s loadtest"))
    return gate


def quality_gate(report: dict[str, Any], cfg: QualityGate) -> GateResult:
    """What the quality evaluators measured (tasks.evaluation.model_quality): first that the judges work
    on held-out corpus audio, then the candidate's replies; a threshold left null is reported in
    the sign-off report but not gated."""
    sets = report.get("sets", {})
    corpus, roundtrip, replies = (sets.get(k, {}) for k in ("corpus", "codec_roundtrip", "replies"))
    planned = [
        ("corpus.emotion_accuracy", corpus.get("emotion_accuracy"), ">=", cfg.min_emotion_judge_accuracy,
         "emotion classifier on held-out corpus audio"),
        ("corpus.speaker_accuracy", corpus.get("speaker_accuracy"), ">=", cfg.min_speaker_judge_accuracy,
         "speaker classifier on held-out corpus audio"),
        ("corpus.cer", corpus.get("cer"), "<=", cfg.max_evaluator_cer, "recognizer on held-out corpus audio"),
        ("codec_roundtrip.cer", roundtrip.get("cer"), "<=", cfg.max_roundtrip_cer, ""),
        ("replies.dnsmos_p808", replies.get("dnsmos_p808"), ">=", cfg.min_reply_mos, ""),
        ("replies.dnsmos_p808_vs_corpus", replies.get("dnsmos_p808_vs_corpus"), ">=", cfg.min_reply_mos_ratio,
         "relative to the corpus's own audio"),
        ("replies.cer", replies.get("cer"), "<=", cfg.max_reply_cer, "against the corpus's reply text"),
        ("replies.emotion_control", replies.get("emotion_control"), ">=", cfg.min_emotion_control, ""),
        ("replies.speaker_control", replies.get("speaker_control"), ">=", cfg.min_speaker_control, ""),
    ]
    return GateResult("quality", [Check(metric, value, op, threshold, note)
                                  for metric, value, op, threshold, note in planned if threshold is not None])


@dataclass
class GateRun:
    """What gate_candidate did: the gates in the order they ran, and what the steps produced."""

    gates: list[GateResult] = field(default_factory=list)
    s2s: Any = None                        # the S2S training result, once the codec gate passed
    bundle: Path | None = None             # the candidate bundle, once the S2S gate passed
    quality: dict[str, Any] | None = None  # the quality report, when the sequence evaluates it
    latency: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every gate passed and the sequence reached the last one (latency)."""
        return bool(self.gates) and self.gates[-1].name == "latency" and all(g.passed for g in self.gates)


def gate_candidate(params: Params, codec: Any, *, train_s2s: Callable[[], Any],
                   export: Callable[[Any, Any], Path], measure_latency: Callable[[Path], dict[str, float]],
                   evaluate_quality: Callable[[Path], dict[str, Any]] | None = None,
                   record: Callable[[GateResult], GateResult] | None = None) -> GateRun:
    """The gate sequence of a candidate: codec gate -> S2S (trained, or loaded) -> S2S gate ->
    bundle -> quality gate (when `evaluate_quality` is given) -> latency gate.

    It stops at the first gate that fails, so no S2S model is trained on a refused codec and no
    latency is measured on a refused model. `record` sees each gate as it is decided (the flow
    logs it and raises GateFailed there); the other steps are what the caller runs them with.
    """
    run = GateRun()

    def decided(result: GateResult) -> bool:
        run.gates.append(record(result) if record else result)
        return result.passed

    if not decided(codec_gate(codec.metrics, codec.baselines, params.gates.codec)):
        return run
    run.s2s = train_s2s()
    if not decided(s2s_gate(run.s2s.metrics, params.codec.codebook_size, params.gates.s2s)):
        return run
    run.bundle = export(codec, run.s2s)
    if evaluate_quality is not None:
        run.quality = evaluate_quality(run.bundle)
        if not decided(quality_gate(run.quality, params.gates.quality)):
            return run
    run.latency = measure_latency(run.bundle)
    decided(latency_gate(run.latency, params.gates.latency))
    return run
