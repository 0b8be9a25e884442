"""Typed access to params.yaml: one loader for the flows, the task CLIs and dvc.yaml.

params.yaml has a `base` section with every setting and `profiles` that override parts of it. The
merged result is validated by pydantic models that forbid unknown keys, so a misspelt parameter
fails at once with its dotted name instead of being silently ignored.

Over 400 lines: one pydantic model per params.yaml section, kept in one file so the schema
reads top to bottom beside params.yaml; the loader itself is the last ~60 lines.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator


class ConfigError(ValueError):
    """A parameter file, profile or override that cannot be used; the message names it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    artifacts: Path
    data: Path
    sources_file: Path


class CorpusConfig(_Section):
    out_dir: Path
    seed: int
    episodes: int
    exchanges_per_episode: int
    sample_rate: int
    turn_gap_s: tuple[float, float]
    exchange_gap_s: tuple[float, float]
    lead_silence_s: float
    noise_snr_db: list[float]
    bad_items: bool

    @field_validator("episodes", "exchanges_per_episode")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


class DownloadConfig(_Section):
    archive: Path
    out_dir: Path
    retries: int
    socket_timeout_s: float
    rate_limit: str | None
    format: str


class NormalizeConfig(_Section):
    out_dir: Path
    sample_rate: int
    loudness_lufs: float
    true_peak_db: float
    truncation_tolerance: float
    max_duration_s: float = 4 * 3600  # longer recordings are refused (decoding holds one whole in memory)


class SegmentConfig(_Section):
    out_dir: Path
    backend: Literal["silero", "pyannote"]
    pyannote_pipeline: str | None
    vad_threshold: float
    vad_lanes: int
    min_silence_ms: int
    speech_pad_ms: int
    merge_gap_s: float
    min_segment_s: float
    max_segment_s: float
    max_speakers: int


class QualityConfig(_Section):
    frame_ms: int
    min_raw_dbfs: float
    min_snr_db: float
    max_clipping_ratio: float
    max_silence_ratio: float
    report_dir: str


class SplitsConfig(_Section):
    seed: int
    val_fraction: float
    test_fraction: float


class PairsConfig(_Section):
    max_gap_s: float
    default_emotion: str


class VersionConfig(_Section):
    enabled: bool
    push: bool
    remote_name: str
    remote_url: str


class BenchConfig(_Section):
    segment_repeats: int


class MlflowConfig(_Section):
    tracking_uri: str | None
    experiment: str
    system_metrics: bool
    lock_wait_s: float = 60.0  # a SQLite store locked by another process is retried this long


class CostConfig(_Section):
    gpu_hour_usd: float
    cpu_hour_usd: float


class CapacityFallback(_Section):
    """The last measured serving capacity, with where it comes from (used without a load test file)."""
    source: str
    cores: int
    sessions: int
    first_audio_ms: dict[int, dict[str, float]]


class InferenceCostConfig(_Section):
    loadtest_json: str
    target_p95_ms: float
    core_hour_usd: float
    load_sessions: int
    hours_per_month: float
    fallback: CapacityFallback


class ConvCodecConfig(_Section):
    """TeluCodec v1: SEANet-style convolutions at the sample rate (models/codec.py)."""
    channels: int
    latent_dim: int
    strides: tuple[int, ...]
    kernel_size: int


class MelCodecSection(_Section):
    """TeluCodec v2: log-mel front end, k-means RVQ, causal vocoder (models/mel_codec.py)."""
    hop_length: int
    mel_n_fft: int
    n_mels: int
    vocoder_n_fft: int
    vocoder_dim: int
    vocoder_layers: int
    vocoder_kernel: int
    quantizer_weighting: Annotated[float, Field(ge=0)]  # k-means in per-bin std^p units of the normalised mel (0: z-scores)


class CodecModelConfig(_Section):
    kind: Literal["mel", "conv"]
    sample_rate: int
    n_codebooks: int
    codebook_size: int
    mel: MelCodecSection
    conv: ConvCodecConfig

    def architecture(self) -> dict[str, Any]:
        """The config dict of the chosen kind, as models.codecs.codec_from_config takes it."""
        shape = self.mel if self.kind == "mel" else self.conv
        return {"kind": self.kind, "sample_rate": self.sample_rate, "n_codebooks": self.n_codebooks,
                "codebook_size": self.codebook_size, **shape.model_dump(mode="json")}


class _TrainConfig(_Section):
    out_dir: Path
    device: str
    seed: int
    batch_size: int
    epochs: int
    max_steps: int | None
    lr: float
    checkpoint_every: int
    log_every: int
    curve_steps: list[int] = []       # steps where the run scores itself and keeps a snapshot (tasks/training/curve.py)

    @field_validator("batch_size", "epochs", "checkpoint_every", "log_every")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


class CodecTrainConfig(_TrainConfig):
    crop_seconds: float
    waveform_weight: float
    kmeans_iterations: int
    gain_augment_db: float
    extra_voice_clips: int = 0        # mel only: codec-only clips in other espeak-ng voices (tasks/training/codec_voices.py)
    unseen_items: int
    adversarial: bool
    eval_items: int


class DistributedConfig(_Section):
    """Multi-process training through torchrun: nodes x processes; 1 x 1 trains in-process."""

    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: str                # host:port of the c10d rendezvous
    rdzv_id: str
    join_timeout_s: int

    @field_validator("nnodes", "nproc_per_node", "join_timeout_s")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


class TokensConfig(_Section):
    out_dir: Path


class S2SModelConfig(_Section):
    d_model: int
    n_layers: int
    n_heads: int
    max_len: int
    dropout: float
    attention_dropout: float
    conditioning: Literal["slot", "every_step"]
    text_stream: bool = False         # the reply's characters as a stream before the codebooks


class LossWeights(_Section):
    """Weight of each stream's tokens in the S2S loss (models.s2s_transformer.S2STransformer.loss)."""
    text: float = 1.0                 # the text stream (a model with one)
    codebook0: float = 1.0            # the coarse codebook: what is said and who says it
    residual: float = 1.0             # codebooks 1..K-1


class S2STrainConfig(_TrainConfig):
    warmup_steps: int
    max_turn_frames: int
    condition_dropout: float      # share of examples trained with the null speaker and emotion
    loss_weights: LossWeights = LossWeights()
    reply_renderings: int = 0     # extra renderings of each train reply in other voices/emotions


class S2SDistillConfig(_Section):
    """Guidance distilled into the S2S model after its training (tasks/training/distill_guidance.py)."""
    out_dir: Path
    steps: int = 0                    # fine-tuning steps; 0 = off (the S2S run is the model)
    guidance: float = 2.0             # the guidance scale whose distribution the student learns
    lr: float = 0.0001                # peak of a short warmup + cosine schedule
    checkpoint_every: int = 100
    seed: int = 47

    @field_validator("steps", "checkpoint_every")
    @classmethod
    def _counts(cls, value: int, info: ValidationInfo) -> int:
        floor = 0 if info.field_name == "steps" else 1
        if value < floor:
            raise ValueError(f"must be at least {floor}" + (" (0: off)" if floor == 0 else ""))
        return value


class AlignConfig(_Section):
    """The CTC aligner whose frame labels are the text stream's targets (tasks/training/align_corpus.py)."""
    out_dir: Path
    n_mels: int
    channels: int
    hidden: int
    layers: int
    kernel_size: int                  # of each block's depthwise conv, in 20 ms frames
    dropout: float
    batch_size: int
    max_steps: int
    lr: float                         # peak of the one-cycle schedule
    seed: int


class CodecGate(_Section):
    """Floors and ceilings for the codec's test-split metrics (null: reported, not gated);
    `beat_baseline` also asks it to beat 8-bit mu-law PCM at the same bitrate, and every codec
    named in `beat_codecs` (tasks/codec_baselines.py) to be matched on STOI and PESQ-wb."""

    min_snr_db: float | None = None
    min_si_sdr_db: float | None = None
    max_mel_distance: float
    min_stoi: float
    min_pesq_wb: float | None = None
    beat_baseline: bool = True
    beat_codecs: tuple[str, ...] = ()


class S2SGate(_Section):
    max_cross_entropy: float
    max_perplexity: float
    max_uniform_ratio: float          # val perplexity / codebook size
    beat_bigram: bool = True          # val cross-entropy below the per-codebook bigram baseline's


class LatencyGate(_Section):
    max_mean_ms: float
    max_p95_ms: float
    max_std_ms: float
    min_capacity_sessions_per_core: float | None = None  # from the last `s2s loadtest`; null: quoted, not gated


class QualityGate(_Section):
    """Thresholds on what the quality evaluators measure (tasks/evaluation/model_quality.py); null = reported only.
    MOS is judged relative to the corpus's own audio (its ceiling), the rest as absolute figures."""
    min_emotion_judge_accuracy: float | None = None  # the emotion classifier on held-out corpus audio
    min_speaker_judge_accuracy: float | None = None  # the speaker classifier on held-out corpus audio
    max_evaluator_cer: float | None = None        # the recognizer on held-out corpus audio
    min_reply_mos_ratio: float | None = None      # DNSMOS P.808 of replies / of corpus audio
    min_reply_mos: float | None = None            # DNSMOS P.808 of replies (checklist: MOS > 4.0)
    max_reply_cer: float | None = None            # checklist: Telugu accuracy > 90% -> CER < 0.10
    min_emotion_control: float | None = None      # checklist: 9 emotions working
    min_speaker_control: float | None = None      # checklist: 4 speakers working
    max_roundtrip_cer: float | None = None        # recognizer CER after a codec round trip


class GatesConfig(_Section):
    codec: CodecGate
    s2s: S2SGate
    latency: LatencyGate
    quality: QualityGate


class AsrConfig(_Section):
    """The CTC recognizer of Telugu graphemes the pipeline trains to judge intelligibility."""
    n_mels: int
    channels: int                     # width of the conv stack
    hidden: int                       # width of each block's per-frame MLP
    layers: int                       # conv blocks
    kernel_size: int                  # of each block's depthwise conv, in 40 ms frames
    dropout: float
    batch_size: int
    max_steps: int
    lr: float                         # peak of the one-cycle schedule
    weight_decay: float
    spec_augment: bool                # mask mel bands and time spans of the training batches
    seed: int


class ClassifierAugmentConfig(_Section):
    """What one classifier's training crops get on top of a random gain (tasks/evaluation/train_classifier.py)."""
    noise_snr_db: tuple[float, float] | None = None   # added noise at a random SNR in this range; null = none
    mel_shift: float = 0.0            # random shift of +-mel_shift mel bins (a voice higher or lower)
    adversary_weight: float = 0.0     # gradient reversal against the other label; 0 = off
    steps_fraction: float = 1.0       # this classifier trains for max_steps x this (at least 1 step)
    rendered_per_control: int = 0     # extra training clips per (speaker, emotion), spoken by espeak-ng
                                      # (tasks/evaluation/judge_renderings.py); 0 = the corpus alone

    @field_validator("rendered_per_control")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 (none) or more")
        return value


class ClassifierConfig(_Section):
    """The utterance classifiers (emotion, speaker) that judge emotion and speaker control."""
    n_mels: int
    channels: int
    batch_size: int
    max_steps: int
    lr: float
    crop_seconds: float
    seed: int
    gain_db: float = 12.0             # random gain of +-gain_db on training crops (the model is level-blind)
    label_smoothing: float = 0.1
    heldout_per_control: int = 0      # the held-out check: val sentences rendered in every control (0 = none)
    emotion: ClassifierAugmentConfig = ClassifierAugmentConfig()
    speaker: ClassifierAugmentConfig = ClassifierAugmentConfig()

    @field_validator("heldout_per_control")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 (none) or more")
        return value


class EvaluationConfig(_Section):
    """What `s2s eval` and the train flow's evaluate-quality step measure, and on how much."""
    out_dir: Path                     # evaluators and reports (per corpus hash / per model)
    threads: int
    asr: AsrConfig
    classifier: ClassifierConfig
    corpus_items: int                 # held-out (test split) segments scored for the ceilings
    reply_inputs: int                 # test-split user turns replies are generated for
    reply_draws: Annotated[int, Field(ge=1)]  # times each reply is sampled: the figures pool them, the report gives the spread
    temperature: float
    top_k: int | None
    max_reply_seconds: float
    working_share: float              # an emotion/speaker "works" at this recall and precision in replies
    sampling_candidates: list[dict[str, float | int | None]] = []  # searched on the val split (tasks/evaluation/sampling_search.py)
    sampling_inputs: int = 2          # validation user turns per candidate (x 12 voices)
    mos: list[Literal["dnsmos", "distillmos"]]


class LatencyConfig(_Section):
    utterances: int                   # test-split user turns streamed through the serving path
    warmup: int
    threads: int
    chunk_ms: int                     # the user's audio arrives in chunks of this length
    reply_frames: int                 # frames generated per reply (first audio needs only 1)


class ServingConfig(_Section):
    temperature: float
    top_k: int | None
    max_reply_seconds: float
    max_utterance_seconds: float
    min_reply_seconds: float
    guidance: float                   # classifier-free guidance on speaker and emotion; 1.0 = off
    sampling: Literal["model", "params"] = "model"   # model: the bundle's validation-chosen settings when it has them
    model: str                        # models:/<name>@<alias>, models:/<name>/<version> or a bundle folder
    host: str
    port: int
    max_sessions: int
    max_message_bytes: int
    max_session_seconds: float
    threads: int
    batching: bool
    vad_silence_ms: int               # server-side end of utterance after this much silence
    vad_threshold_dbfs: float
    token_env: str
    shutdown_grace_s: float
    session_drain_s: float            # draining: how long live sessions may go on (0: only replies finish)
    ahead_ms: float = 0.0             # deadline scheduling: a reply this far ahead of playback waits a tick
    encode_hops: int = 1              # user audio encoded in chunks of this many hops while they speak
    precision: Literal["fp32", "int8"] = "fp32"  # int8: dynamic quantization of the linear layers


class RegistryConfig(_Section):
    model_name: str
    auto_promote: bool                # champion at once when the gates pass (no sign-off)
    reevaluate_champion: bool         # judged by other judges: evaluate the champion again before comparing
    required_roles: list[Literal["technical_lead", "project_manager", "business_head"]]


class PublishConfig(_Section):
    enabled: bool
    out_dir: Path
    endpoint: str | None              # HF_ENDPOINT wins; null = the public Hub
    namespace: str | None             # user or organisation; null = the token's user
    codec_repo: str
    s2s_repo: str
    private: bool
    license: str
    token_env: str                    # name of the variable holding the token (never its value)


class Params(_Section):
    """All settings of one profile, with paths resolved against the project root."""

    profile: str
    root: Path
    paths: PathsConfig
    corpus: CorpusConfig
    download: DownloadConfig
    normalize: NormalizeConfig
    segment: SegmentConfig
    quality: QualityConfig
    splits: SplitsConfig
    pairs: PairsConfig
    version: VersionConfig
    bench: BenchConfig
    mlflow: MlflowConfig
    cost: CostConfig
    inference_cost: InferenceCostConfig
    codec: CodecModelConfig
    codec_train: CodecTrainConfig
    distributed: DistributedConfig
    tokens: TokensConfig
    s2s: S2SModelConfig
    s2s_train: S2STrainConfig
    s2s_distill: S2SDistillConfig
    align: AlignConfig
    gates: GatesConfig
    latency: LatencyConfig
    evaluation: EvaluationConfig
    serving: ServingConfig
    registry: RegistryConfig
    publish: PublishConfig

    def path(self, relative: Path | str) -> Path:
        """A params path made absolute against the project root (absolute paths pass through)."""
        p = Path(os.path.expanduser(str(relative)))
        return p if p.is_absolute() else self.root / p


def find_root(start: Path | None = None) -> Path:
    """The project root: S2S_ROOT, else the nearest folder upwards holding params.yaml."""
    if env := os.environ.get("S2S_ROOT"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    packaged = Path(__file__).resolve().parent.parent
    if (packaged / "params.yaml").is_file():
        return packaged
    raise ConfigError(f"no params.yaml found in {here} or above; set S2S_ROOT to the project root")


def _deep_merge(base: dict[str, Any], override: dict[str, Any], where: str = "") -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{where}{key}"
        if key not in merged:
            raise ConfigError(f"unknown parameter {dotted!r}")
        if isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = _deep_merge(merged[key], value, dotted + ".")
        else:
            merged[key] = value
    return merged


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`section.key=value` strings (values parsed as YAML) into a nested override dict."""
    nested: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form section.key=value")
        dotted, raw = pair.split("=", 1)
        keys = dotted.strip().split(".")
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return nested


def load_params(
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    root: Path | None = None,
) -> Params:
    """Read params.yaml, apply the profile then `overrides`, and validate the result."""
    root = (root or find_root()).resolve()
    params_file = root / "params.yaml"
    try:
        raw = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{params_file} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{params_file} is not valid YAML: {exc}") from exc
    profiles = raw.get("profiles") or {}
    profile = profile or raw.get("default_profile") or "smoke"
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r}: params.yaml has {', '.join(sorted(profiles))}")
    merged = _deep_merge(raw["base"], profiles[profile] or {})
    merged = _deep_merge(merged, overrides or {})
    try:
        return Params(profile=profile, root=root, **merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid parameters for profile {profile!r}: {problems}") from exc
