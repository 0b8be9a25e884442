"""Quality evaluation: MOS, Telugu intelligibility, emotion and speaker control of a candidate.

What the checklist asks of the voice ("MOS > 4.0", "Telugu accuracy > 90%", "Emotion
recognition > 85%", 9 emotions and 4 speakers "working") is measured here on three sets of audio,
each judged by the same evaluators:

- corpus: held-out (test split) corpus audio itself. This is the ceiling: espeak-ng Telugu scores
  about 3.3 on DNSMOS P.808, so no model trained on it can be expected to reach the checklist's
  4.0, and the evaluators' own errors bound what they can credit a model with.
- codec_roundtrip: the same audio through the candidate's codec (encode, decode).
- replies: replies the candidate generates to test-split user turns, for every one of the 9
  emotions (in the pair's reply speaker) and every one of the 4 speakers (in the pair's reply
  emotion). Emotion and speaker control are the share of replies the classifiers recognise as
  the requested label; the CER compares replies spoken in the pair's own emotion with the text
  of the corpus's reply: how close the reply is to what the corpus answers ("appropriateness").
  A model with a text stream also says what it spoke: intelligibility is then the recognizer's
  CER on every reply against that text (what a listener recovers of what the model meant to say).
- rendered: the same test replies' sentences spoken by espeak-ng, as the corpus speaks them, in
  exactly the controls the replies are asked for (tasks.evaluation.rendered_ceiling). The corpus's
  test split holds 2 of the 9 emotions; this set is the judges' ceiling on all 9 emotions and 4
  speakers: the most "working" they can credit a perfect model with.

The evaluators (tasks.evaluation.train_asr, tasks.evaluation.train_classifier) are trained once per corpus version and
reused (their stamps hold the corpus hash); MOS comes from DNSMOS and DistillMOS, whose weights
ship in their PyPI packages (tasks.evaluation.mos). Results go to quality.json (atomic) under
evaluation.out_dir/<bundle sha> and to an MLflow run `quality` beside the candidate's runs.

About 450 lines: the four audio sets, the evaluators and the report are one evaluation;
its figures and their table are read together.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from core import atomic
from core.config import Params
from core.labels import EMOTIONS, SPEAKERS
from serving.bundle import ModelBundle, recorded_sampling
from serving.session import GenerationSettings, reply_budget
from tasks.data.corpus_audio import CorpusError, read_manifest

SETS = ("corpus", "codec_roundtrip", "replies", "rendered")
CONTROL_SETS = ("replies", "rendered")   # judged over the emotion and speaker sweeps
SET_TITLES = ("corpus audio (ceiling)", "codec round trip", "generated replies", "renderings, every control (ceiling)")


@dataclass(frozen=True)
class Clip:
    """Audio with what it should be judged against (text "" = no reference text)."""

    audio: np.ndarray
    text: str
    speaker: str
    emotion: str
    judged_for: tuple[str, ...] = ("emotion", "speaker")  # which control figures this clip counts in
    said: str = ""   # a reply's own text (a model with a text stream): what intelligibility is judged against
    draw: int = 0    # which sample of the same reply this is (evaluation.reply_draws)


@dataclass(frozen=True)
class ReplyRequest:
    """A test-split user turn and the reply the corpus gives to it."""

    pair_id: str
    user_audio: np.ndarray
    reply_text: str
    reply_speaker: str
    reply_emotion: str


@dataclass
class Judges:
    """The trained evaluators and the MOS scorer, with the runs that trained them."""

    recognizer: Any
    emotion: Any
    speaker: Any
    mos: Any
    runs: dict[str, str | None] = field(default_factory=dict)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_judges(params: Params, parent_run_id: str | None = None, use_mlflow: bool = True,
                force: bool = False) -> Judges:
    """Train (or reuse, same corpus and settings) the recognizer and both classifiers, load MOS."""
    from models.asr import load_recognizer
    from models.utterance_classifier import load_classifier
    from tasks.evaluation.mos import MosScorer
    from tasks.evaluation.train_asr import train_asr
    from tasks.evaluation.train_classifier import train_classifier

    asr = train_asr(params, force=force, parent_run_id=parent_run_id, use_mlflow=use_mlflow)
    emotion = train_classifier(params, "emotion", force=force, parent_run_id=parent_run_id, use_mlflow=use_mlflow)
    speaker = train_classifier(params, "speaker", force=force, parent_run_id=parent_run_id, use_mlflow=use_mlflow)
    return Judges(
        recognizer=load_recognizer(Path(asr.checkpoint)),
        emotion=load_classifier(Path(emotion.checkpoint)),
        speaker=load_classifier(Path(speaker.checkpoint)),
        mos=MosScorer(list(params.evaluation.mos), threads=params.evaluation.threads),
        runs={"asr": asr.run_id, "emotion": emotion.run_id, "speaker": speaker.run_id},
        training={"asr": {"metrics": asr.metrics, "cached": asr.cached, "seconds": asr.seconds},
                  "emotion": {"metrics": emotion.metrics, "cached": emotion.cached, "seconds": emotion.seconds},
                  "speaker": {"metrics": speaker.metrics, "cached": speaker.cached, "seconds": speaker.seconds}},
        checkpoints={"asr": asr.checkpoint, "emotion": emotion.checkpoint, "speaker": speaker.checkpoint},
    )


def quality_stamp(params: Params, bundle_id: str, judges: Judges) -> dict[str, Any]:
    """What a quality report depends on: the candidate, the evaluators' weights, the corpus, the
    settings and this code. An unchanged stamp reuses the report (a re-run of the train flow)."""
    from core.hashing import code_hash, file_sha256
    from tasks.training.provenance import corpus_fingerprint

    return {"bundle": bundle_id, "corpus": corpus_fingerprint(params),
            "evaluators": {k: file_sha256(Path(v)) for k, v in judges.checkpoints.items()},
            "evaluation": params.evaluation.model_dump(mode="json", exclude={"out_dir", "threads"}),
            "guidance": params.serving.guidance,
            "code": code_hash(sys.modules[__name__])}


def _read(data_dir: Path, relative: str) -> np.ndarray:
    audio, _ = sf.read(data_dir / relative, dtype="float32")
    return audio


def corpus_clips(params: Params, limit: int) -> list[Clip]:
    """The first `limit` test-split segments (by id): the audio the ceilings are measured on."""
    data_dir = params.path(params.paths.data)
    rows = read_manifest(data_dir)
    rows = rows[rows["split"] == "test"].sort_values("segment_id").head(limit)
    if rows.empty:
        raise CorpusError(f"the corpus at {data_dir} has no test split to evaluate on")
    return [Clip(_read(data_dir, r.path), r.text, r.speaker, r.emotion) for r in rows.itertuples()]


def reply_requests(params: Params, limit: int, split: str = "test") -> list[ReplyRequest]:
    """`limit` pairs of a split (test unless told) whose reply has a known text, taken in turn
    from each of its recordings (by id), so that every recording's speakers and emotion are asked for."""
    data_dir = params.path(params.paths.data)
    rows = read_manifest(data_dir).set_index("segment_id")
    pairs_path = data_dir / "pairs.jsonl"
    if not pairs_path.is_file():
        raise CorpusError(f"no pairs at {pairs_path}: run `s2s flow data` first")
    by_recording: dict[str, list[dict]] = {}
    for pair in sorted((json.loads(line) for line in pairs_path.read_text().splitlines() if line.strip()),
                       key=lambda p: p["pair_id"]):
        if pair["split"] == split and rows.loc[pair["reply_segment"], "text"]:
            by_recording.setdefault(pair["recording_id"], []).append(pair)
    interleaved = [p for group in itertools.zip_longest(*by_recording.values()) for p in group if p]
    requests = []
    for pair in interleaved:
        requests.append(ReplyRequest(pair["pair_id"], _read(data_dir, rows.loc[pair["input_segment"], "path"]),
                                     rows.loc[pair["reply_segment"], "text"], pair["reply_speaker"],
                                     pair["reply_emotion"]))
        if len(requests) == limit:
            break
    if not requests:
        raise CorpusError(f"the corpus at {data_dir} has no {split}-split pairs with reply text")
    return requests


@torch.inference_mode()
def codec_roundtrip(bundle: ModelBundle, clips: list[Clip]) -> list[Clip]:
    """Each clip through the codec (encode, decode), cut to its own length."""
    out = []
    for clip in tqdm(clips, desc="codec round trip", unit="clip"):
        wav = torch.from_numpy(clip.audio)[None, None]
        decoded = bundle.codec.decode(bundle.codec.encode(wav))[0, 0, : len(clip.audio)].numpy()
        out.append(Clip(np.ascontiguousarray(decoded), clip.text, clip.speaker, clip.emotion))
    return out


def conditions_for(request: ReplyRequest) -> list[tuple[str, str, tuple[str, ...]]]:
    """(speaker, emotion, sweeps) of the replies made for one request: the 9 emotions in the
    pair's reply speaker (the emotion sweep), then the 3 other speakers in the pair's reply emotion
    (with the pair's own voice, the speaker sweep)."""
    own = (request.reply_speaker, request.reply_emotion)
    return ([(request.reply_speaker, e, ("emotion", "speaker") if (request.reply_speaker, e) == own else ("emotion",))
             for e in EMOTIONS]
            + [(s, request.reply_emotion, ("speaker",)) for s in SPEAKERS if s != request.reply_speaker])


@torch.inference_mode()
def generate_replies(bundle: ModelBundle, requests: list[ReplyRequest], params: Params, draws: int = 1) -> list[Clip]:
    """Replies to every request under every condition, batched per request (one user turn, 12
    voices), `draws` times over (one generator, so draw 0 is the same with any `draws`). A row
    ends at its first PAD frame (EOS); each row is decoded on its own."""
    cfg = params.evaluation
    settings = GenerationSettings(cfg.temperature, cfg.top_k, cfg.max_reply_seconds,
                                  params.serving.max_utterance_seconds, params.serving.min_reply_seconds,
                                  params.serving.guidance)
    codec, model = bundle.codec, bundle.s2s
    generator = torch.Generator().manual_seed(params.evaluation.asr.seed)
    replies: list[Clip] = []
    for draw, request in tqdm([(d, r) for d in range(draws) for r in requests], desc="generate replies", unit="turn"):
        conditions = conditions_for(request)
        user = codec.encode(torch.from_numpy(request.user_audio)[None, None])
        max_frames, room, min_frames = reply_budget(settings, codec.frame_rate, model.config)
        user = user[:, :, -room:].expand(len(conditions), -1, -1)
        speaker = torch.tensor([SPEAKERS.index(s) for s, _, _ in conditions])
        emotion = torch.tensor([EMOTIONS.index(e) for _, e, _ in conditions])
        steps = list(model.reply_frames(user, speaker, emotion, max_frames, settings.temperature, settings.top_k,
                                        generator, min_frames, settings.guidance))
        frames = torch.cat([step.codes for step in steps], dim=-1)
        for row, (spk, emo, sweeps) in enumerate(conditions):
            ended = (frames[row, 0] == model.config.pad_id).nonzero()
            length = int(ended[0]) if len(ended) else frames.shape[-1]
            audio = codec.decode(frames[row: row + 1, :, :length])[0, 0].numpy() if length else np.zeros(0, np.float32)
            text = request.reply_text if emo == request.reply_emotion else ""  # the corpus reply says this
            said = (model.config.spoken_text([int(step.text[row]) for step in steps[:length]])
                    if model.config.text_stream else "")
            replies.append(Clip(np.ascontiguousarray(audio), text, spk, emo, sweeps, said, draw))
    return replies


def rendered_clips(params: Params, requests: list[ReplyRequest]) -> list[Clip]:
    """Each request's reply sentence spoken by espeak-ng in every control its replies are asked
    for, judged for the same sweeps: the judges' ceiling (tasks.evaluation.rendered_ceiling)."""
    from tasks.evaluation.rendered_ceiling import render_controls

    clips: list[Clip] = []
    for number, request in enumerate(tqdm(requests, desc="render every control", unit="turn")):
        conditions = conditions_for(request)
        try:
            rendered = render_controls(params, request.reply_text, [(s, e) for s, e, _ in conditions],
                                       seed=params.evaluation.asr.seed + number)
        except ValueError as exc:  # a reply that is only an interjection: no sentence to say again
            print(f"renderings: pair {request.pair_id} skipped: {exc}", flush=True)
            continue
        clips += [Clip(audio, said, speaker, emotion, sweeps, said)
                  for (audio, said), (speaker, emotion, sweeps) in zip(rendered, conditions)]
    return clips


def add_control_figures(figures: dict[str, float], matrices: dict[str, Any], working_share: float) -> None:
    """A set judged over the control sweeps: accuracy becomes control, plus the labels working."""
    if not matrices:
        return
    for kind in ("emotion", "speaker"):
        for suffix in ("", "_min", "_max"):
            if f"{kind}_accuracy{suffix}" in figures:
                figures[f"{kind}_control{suffix}"] = figures.pop(f"{kind}_accuracy{suffix}")
    figures["emotions_working"] = float(len(working_labels(matrices["emotion"], EMOTIONS, working_share)))
    figures["speakers_working"] = float(len(working_labels(matrices["speaker"], SPEAKERS, working_share)))


def confusion(true: list[str], predicted: list[str], labels: tuple[str, ...]) -> list[list[int]]:
    """Rows: the true (or requested) label, columns: the predicted one, in `labels` order."""
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(true, predicted):
        if t in labels and p in labels:
            matrix[labels.index(t)][labels.index(p)] += 1
    return matrix


def per_label_recall(matrix: list[list[int]], labels: tuple[str, ...]) -> dict[str, float]:
    """Share of the clips asking for each label that were recognised as it (labels asked for)."""
    return {label: (row[i] / sum(row)) for i, (label, row) in enumerate(zip(labels, matrix)) if sum(row)}


def per_label_precision(matrix: list[list[int]], labels: tuple[str, ...]) -> dict[str, float]:
    """Share of the clips recognised as each label that asked for it (labels recognised at all)."""
    columns = [sum(row[i] for row in matrix) for i in range(len(labels))]
    return {label: matrix[i][i] / columns[i] for i, label in enumerate(labels) if columns[i]}


def judge(clips: list[Clip], judges: Judges, mos: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
    """MOS (unless `mos` is false), CER, emotion and speaker accuracy of one set; and its
    confusion matrices. Clips from several draws are pooled, and each figure's range over the
    draws is added as `<figure>_min` / `<figure>_max` (from the same judgements, no extra pass)."""
    from models.asr import cer

    scorable = [c for c in clips if len(c.audio) >= 0.25 * 16000]
    figures: dict[str, float] = {"items": float(len(clips)), "too_short": float(len(clips) - len(scorable))}
    if not scorable:
        return figures, {}
    draws = sorted({c.draw for c in scorable})
    by_draw: dict[str, list[float]] = {}
    audio = [np.clip(c.audio, -1.0, 1.0) for c in scorable]
    if mos:
        figures |= judges.mos.score(audio)
    heard = [(a, c) for a, c in zip(audio, scorable) if c.text or c.said]
    hyps = judges.recognizer.transcribe([a for a, _ in heard]) if heard else []
    with_text = [(h, c.text) for h, (_, c) in zip(hyps, heard) if c.text]
    if with_text:
        figures["cer"] = cer([h for h, _ in with_text], [t for _, t in with_text])
        figures["telugu_accuracy"] = max(0.0, 1.0 - figures["cer"])
    with_said = [(h, c.said, c.draw) for h, (_, c) in zip(hyps, heard) if c.said]
    if with_said:  # the reply against its own text: intelligibility
        figures["intelligibility_cer"] = cer([h for h, _, _ in with_said], [t for _, t, _ in with_said])
        figures["intelligibility"] = max(0.0, 1.0 - figures["intelligibility_cer"])
        by_draw["intelligibility_cer"] = [cer([h for h, _, n in with_said if n == d], [t for _, t, n in with_said if n == d])
                                          for d in draws if any(n == d for *_, n in with_said)]
    matrices = {}
    for kind, judge_of, labels in (("emotion", judges.emotion, EMOTIONS), ("speaker", judges.speaker, SPEAKERS)):
        judged = [(a, getattr(c, kind), c.draw) for a, c in zip(audio, scorable) if kind in c.judged_for]
        if not judged:
            continue
        predicted = judge_of.predict([a for a, _, _ in judged])
        right = [(p == t, d) for p, (_, t, d) in zip(predicted, judged)]
        figures[f"{kind}_accuracy"] = float(np.mean([r for r, _ in right]))
        figures[f"{kind}_judged"] = float(len(judged))  # the share's count: one reply's weight in promotion
        by_draw[f"{kind}_accuracy"] = [float(np.mean([r for r, n in right if n == d]))
                                       for d in draws if any(n == d for _, n in right)]
        matrices[kind] = confusion([t for _, t, _ in judged], predicted, labels)
    if len(draws) > 1:
        figures["draws"] = float(len(draws))
        for key, values in by_draw.items():
            figures[f"{key}_min"], figures[f"{key}_max"] = min(values), max(values)
    return figures, matrices


def working_labels(matrix: list[list[int]], labels: tuple[str, ...], min_share: float) -> list[str]:
    """Labels that work: replies asking for one are recognised as it at least `min_share` of the
    time (recall), and replies recognised as it asked for it at least as often (precision), so a
    model whose every reply sounds like one label does not get that label ticked."""
    recall, precision = per_label_recall(matrix, labels), per_label_precision(matrix, labels)
    return [label for label in labels if recall.get(label, 0.0) >= min_share and precision.get(label, 0.0) >= min_share]


def with_sampling(params: Params, recorded: dict[str, Any] | None) -> Params:
    """`params` whose replies are sampled with the recorded settings (under `serving.sampling: model`)."""
    chosen = GenerationSettings.from_params(params.serving, recorded)
    evaluation = params.evaluation.model_copy(update={"temperature": chosen.temperature, "top_k": chosen.top_k}) \
        if recorded and params.serving.sampling == "model" else params.evaluation
    serving = params.serving.model_copy(update={"guidance": chosen.guidance})
    return params.model_copy(update={"evaluation": evaluation, "serving": serving})


def evaluate_quality(bundle: ModelBundle, params: Params, bundle_id: str, parent_run_id: str | None = None,
                     use_mlflow: bool = True, force: bool = False) -> dict[str, Any]:
    """Measure the three sets with the evaluators; write quality.json; log an MLflow run. Replies
    are sampled as serving would: with the bundle's validation-chosen settings when it records them."""
    started = time.monotonic()
    params = with_sampling(params, recorded_sampling(bundle.meta))
    cfg = params.evaluation
    out = params.path(cfg.out_dir) / bundle_id / "quality.json"
    with torch_threads(cfg.threads):
        judges = load_judges(params, parent_run_id, use_mlflow, force)
        stamp = json.loads(json.dumps(quality_stamp(params, bundle_id, judges)))
        if not force and out.is_file():
            stored = json.loads(out.read_text())
            if stored.get("stamp") == stamp and (stored.get("run_id") or not use_mlflow):
                return {**stored, "path": str(out), "cached": True}
        corpus = corpus_clips(params, cfg.corpus_items)
        sets: dict[str, dict[str, float]] = {}
        matrices: dict[str, dict[str, Any]] = {}
        sets["corpus"], matrices["corpus"] = judge(corpus, judges)
        sets["codec_roundtrip"], matrices["codec_roundtrip"] = judge(codec_roundtrip(bundle, corpus), judges)
        requests = reply_requests(params, cfg.reply_inputs)
        replies = generate_replies(bundle, requests, params, cfg.reply_draws)
        sets["replies"], matrices["replies"] = judge(replies, judges)
        sets["rendered"], matrices["rendered"] = judge(rendered_clips(params, requests), judges, mos=False)
    for name in CONTROL_SETS:
        add_control_figures(sets[name], matrices[name], cfg.working_share)
    corpus_mos = sets["corpus"].get("dnsmos_p808")
    if corpus_mos and sets["replies"].get("dnsmos_p808") is not None:
        sets["replies"]["dnsmos_p808_vs_corpus"] = sets["replies"]["dnsmos_p808"] / corpus_mos
    report = {
        "bundle": bundle_id, "profile": params.profile, "sets": sets, "confusion": matrices,
        "labels": {"emotion": list(EMOTIONS), "speaker": list(SPEAKERS)},
        "working_share": cfg.working_share,
        "evaluators": {"runs": judges.runs, "training": judges.training},
        "seconds": round(time.monotonic() - started, 1), "stamp": stamp, "run_id": None,
    }
    atomic.write_json(out, report)
    if use_mlflow:
        report["run_id"] = log_quality_run(params, report, out, parent_run_id)
        atomic.write_json(out, report)  # with its run: a re-run reuses both
    return {**report, "path": str(out), "cached": False}


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """`set.figure` -> value, finite values only (what MLflow and the gates read)."""
    return {f"{name}.{key}": float(value) for name, figures in report["sets"].items()
            for key, value in figures.items() if isinstance(value, (int, float)) and math.isfinite(value)}


def log_quality_run(params: Params, report: dict[str, Any], path: Path, parent_run_id: str | None) -> str:
    """An MLflow run `quality` (child of the train run when there is one) with every figure, the
    confusion matrices and the evaluators' run ids as tags."""
    import mlflow

    from tasks.training.provenance import run_tags
    from tasks.training.tracker import use_experiment

    use_experiment(params.root, params.mlflow.tracking_uri, params.mlflow.experiment)
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    tags = {**run_tags(params, "quality"), "bundle": report["bundle"],
            **{f"evaluator.{k}_run_id": str(v) for k, v in report["evaluators"]["runs"].items()}}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment.experiment_id, run_name="quality", tags=tags)
    run_id = run.info.run_id
    for key, value in flat_metrics(report).items():
        client.log_metric(run_id, key, value)
    client.log_artifact(run_id, str(path))
    markdown = path.with_name("quality.md")
    atomic.write_text(markdown, quality_markdown(report))
    client.log_artifact(run_id, str(markdown))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def record_on_version(params: Params, version: str, report: dict[str, Any]) -> str:
    """Tag a registered version (number or alias) with the figures and the quality run, so that
    its sign-off report shows a quality evaluation made after registration."""
    from tasks.release.registry import mlflow_client

    client = mlflow_client(params)
    name = params.registry.model_name
    number = version if version.isdigit() else client.get_model_version_by_alias(name, version).version
    for key, value in flat_metrics(report).items():
        client.set_model_version_tag(name, number, f"quality.{key}", f"{value:.4g}")
    client.set_model_version_tag(name, number, "quality_run_id", str(report.get("run_id")))
    for judge, run_id in report["evaluators"]["runs"].items():  # the judges these figures are now by
        client.set_model_version_tag(name, number, f"evaluator.{judge}_run_id", str(run_id))
    return str(number)


FIGURES = [  # (key, label, format)
    ("dnsmos_p808", "DNSMOS P.808", "{:.2f}"),
    ("dnsmos_ovrl", "DNSMOS OVRL", "{:.2f}"),
    ("distillmos", "DistillMOS", "{:.2f}"),
    ("cer", "CER (Telugu code points)", "{:.3f}"),
    ("emotion_accuracy", "emotion recognised", "{:.1%}"),
    ("speaker_accuracy", "speaker recognised", "{:.1%}"),
]


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """figure | one column per set of SETS (SET_TITLES); a report without a set shows "—" there."""
    sets = report["sets"]
    reply_key = {"emotion_accuracy": "emotion_control", "speaker_accuracy": "speaker_control"}
    figures = FIGURES
    if "intelligibility_cer" in sets.get("replies", {}):  # a text stream: the replies' CER against what they
        reply_key["cer"] = "intelligibility_cer"          # said beside the corpus audio's, the corpus reply apart
        figures = [*FIGURES, ("appropriateness_cer", "appropriateness: CER against the corpus's reply", "{:.3f}")]
    rows = []
    for key, label, fmt in figures:
        cells = []
        for name in SETS:
            if key == "appropriateness_cer":
                value = sets.get(name, {}).get("cer") if name == "replies" else None
            else:
                value = sets.get(name, {}).get(reply_key.get(key, key) if name in CONTROL_SETS else key)
            cells.append("—" if value is None else fmt.format(value))
        rows.append([label, *cells])
    return rows


def working_sentence(report: dict[str, Any]) -> str:
    """How many labels work in the replies, beside the judges' ceiling on the renderings."""
    replies, rendered = (report["sets"].get(name, {}) for name in CONTROL_SETS)
    ceiling = (f" (the judges' ceiling, espeak-ng renderings of the same replies: {int(rendered['emotions_working'])}/9"
               f" and {int(rendered['speakers_working'])}/4)") if "emotions_working" in rendered else ""
    return (f"Emotions working: {int(replies.get('emotions_working', 0))}/9; speakers working: "
            f"{int(replies.get('speakers_working', 0))}/4{ceiling}; recall and precision >= "
            f"{report['working_share']:.0%}, emotion control over the 9-emotion sweep, speaker control over "
            "the 4-speaker sweep.")


def draws_sentence(report: dict[str, Any]) -> str:
    """How many times each reply was sampled, and how far one draw's figures stray from another's
    ("" for a single draw): the pooled figures above are what a reviewer should compare."""
    replies = report["sets"].get("replies", {})
    if "draws" not in replies:
        return ""
    ranges = [f"{label} {fmt.format(replies[key + '_min'])} to {fmt.format(replies[key + '_max'])}"
              for key, label, fmt in (("intelligibility_cer", "intelligibility CER", "{:.3f}"),
                                      ("emotion_control", "emotion control", "{:.1%}"),
                                      ("speaker_control", "speaker control", "{:.1%}"))
              if key + "_min" in replies]
    return (f"Each reply was sampled {int(replies['draws'])} times and the figures pool the draws; "
            f"one draw alone gives {', '.join(ranges)}.")


def quality_markdown(report: dict[str, Any]) -> str:
    lines = ["| figure | " + " | ".join(SET_TITLES) + " |", "|---|" + "---|" * len(SET_TITLES)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += ["", working_sentence(report)]
    if draws := draws_sentence(report):
        lines += ["", draws]
    for name, title in (("replies", "Replies"), ("rendered", "Renderings (the judges' ceiling)")):
        for kind in ("emotion", "speaker"):
            matrix = report["confusion"].get(name, {}).get(kind)
            if not matrix:
                continue
            labels = report["labels"][kind]
            lines += ["", f"{title}: requested {kind} (rows) against recognised {kind} (columns)", "",
                      "| requested | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
            lines += [f"| {label} | " + " | ".join(str(v) for v in row) + " |" for label, row in zip(labels, matrix)]
    return "\n".join(lines) + "\n"
