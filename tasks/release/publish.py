"""Publish a model bundle to the Hugging Face Hub as two model repos: the codec and the S2S model.

    <out_dir>/codec/   codec.pt  config.json  bundle.json  README.md  SHA256SUMS
    <out_dir>/s2s/     s2s.pt    config.json  bundle.json  README.md  SHA256SUMS
    <out_dir>/publish.json   what the last attempt did (mode local / hub / failed)

The repo folders are always staged locally first (each appears whole or not at all). With a
token (the variable `publish.token_env` names), both repos are created (or reused), uploaded, then
downloaded back at the commit just made and every file checked against SHA256SUMS: a publish
that cannot be read back identically is an error, not a success. Without a token nothing leaves
the machine and the report says where the folders are and which variable to set.

The token is never logged, stored or put in a message: every error raised by huggingface_hub is
re-raised as a PublishError whose text has the token (and anything shaped like one) redacted.

Transport: downloads fall back to plain HTTP by themselves when the server sends no Xet headers.
Uploads do not: with hf_xet installed, huggingface_hub 2.4.0 sends every file the server calls
"lfs" through Xet, so before uploading we ask the server for a Xet write token and, where it
offers none (a self-hosted or older Hub), upload through the classic LFS protocol instead.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import yaml

from core import atomic
from core.config import PublishConfig
from core.hashing import file_sha256
from serving.bundle import CODEC_FILE, META_FILE, S2S_FILE, BundleError, bundle_sha, read_meta

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
SUMS_FILE = "SHA256SUMS"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
REPORT_FILE = "publish.json"
WEIGHTS = {"codec": CODEC_FILE, "s2s": S2S_FILE}
_TOKEN_SHAPES = re.compile(r"(?i)(bearer\s+)[^\s'\"]+|\bhf_[A-Za-z0-9]{8,}")
_XET_LOCK = threading.Lock()
T = TypeVar("T")


class PublishError(RuntimeError):
    """Publishing failed; the message says which step and repo, with the token redacted."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass
class RepoReport:
    """One of the two repos: where it was staged, and where it went."""

    kind: str                          # "codec" or "s2s"
    local_dir: str
    files: dict[str, str]              # name -> sha256, SHA256SUMS included
    repo_id: str | None = None
    url: str | None = None
    commit: str | None = None
    commit_url: str | None = None
    private: bool | None = None
    verified: bool = False


@dataclass
class PublishReport:
    """What publish_bundle did; `asdict` gives the JSON written to publish.json."""

    mode: str                          # "local" (nothing uploaded), "hub", or "failed"
    message: str
    bundle_dir: str
    out_dir: str
    model_name: str
    version: str | None
    bundle_sha: str
    endpoint: str
    token_env: str
    repos: list[RepoReport] = field(default_factory=list)
    verified: bool = False
    transport: str | None = None       # "xet" or "http" for the upload; None when nothing was uploaded


# -- redaction and error wrapping ---------------------------------------------------------------


def redact(text: str, token: str | None) -> str:
    """`text` with the token, bearer credentials and anything shaped like an HF token replaced.

    Redacting the shapes too covers a server or proxy that echoes a credential other than ours.
    """
    if token:
        text = text.replace(token, "***")
    return _TOKEN_SHAPES.sub(lambda m: f"{m.group(1)}***" if m.group(1) else "***", text)


def _describe(exc: BaseException) -> str:
    """The exception's own words plus, for huggingface_hub's re-raised errors, the server's."""
    text = f"{type(exc).__name__}: {str(exc).strip()}"
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text += f" (caused by {type(cause).__name__}: {str(cause).strip()})"
    return re.sub(r"\s*\n\s*", " ", text)  # one line: the CLI and the Prefect UI show it as is


@contextmanager
def _redacted_logs(token: str | None) -> Iterator[None]:
    """Redact the token from every log record made during the block, whichever library logs it.

    huggingface_hub never logs the token, but at DEBUG level httpcore logs response headers, and a
    server or proxy that echoes the credential would put it there. A record factory sees every
    record (and its traceback) before any handler does.
    """
    if not token:
        yield
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error handling
            return record
        if token in text:
            record.msg, record.args = redact(text, token), ()
        if record.exc_info:
            formatted = logging.Formatter().formatException(record.exc_info)
            if token in formatted:  # handlers print exc_text as given when exc_info is gone
                record.exc_text, record.exc_info = redact(formatted, token), None
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


def _status_code(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _hub_call(what: str, token: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one huggingface_hub call; turn any failure into a PublishError saying what was being done.

    The PublishError is raised outside the `except` block so it carries no __context__: a traceback
    printed later cannot show the original, unredacted message.
    """
    try:
        return fn(*args, **kwargs)
    except PublishError:
        raise
    except Exception as exc:  # HfHubHTTPError, httpx errors, ValueError from the client, OSError...
        error = PublishError(redact(f"{what} failed: {_describe(exc)}", token), _status_code(exc))
    raise error


# -- staging --------------------------------------------------------------------------------------


def hub_endpoint(cfg: PublishConfig) -> str:
    """HF_ENDPOINT, else publish.endpoint, else the public Hub (the order params.yaml documents)."""
    return (os.environ.get("HF_ENDPOINT") or cfg.endpoint or DEFAULT_ENDPOINT).rstrip("/")


def repo_ids(cfg: PublishConfig, namespace: str | None) -> dict[str, str]:
    """`namespace/name` for both repos; a repo name that already has a namespace keeps it."""
    names = {"codec": cfg.codec_repo, "s2s": cfg.s2s_repo}
    owner = namespace or cfg.namespace or "<namespace>"
    return {kind: name if "/" in name else f"{owner}/{name}" for kind, name in names.items()}


def write_sums(folder: Path) -> Path:
    """SHA256SUMS of every other file in `folder`, in `sha256sum` format (`sha256sum -c` reads it)."""
    lines = [f"{file_sha256(p)}  {p.name}\n" for p in sorted(folder.iterdir())
             if p.is_file() and p.name != SUMS_FILE]
    target = folder / SUMS_FILE
    target.write_text("".join(lines), encoding="utf-8")
    return target


def read_sums(path: Path) -> dict[str, str]:
    """name -> sha256 from a SHA256SUMS file (text or binary mode markers both accepted)."""
    sums = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*").strip()] = digest.lower()
    return sums


def verify_folder(folder: Path) -> dict[str, str]:
    """Check every file SHA256SUMS lists; return name -> sha256 for all files, SHA256SUMS included."""
    folder = Path(folder)
    sums = read_sums(folder / SUMS_FILE)
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            raise PublishError(f"{folder}: {name} is listed in {SUMS_FILE} but missing")
        if file_sha256(path) != digest:
            raise PublishError(f"{path} does not match its sha256 in {SUMS_FILE}")
    return {**sums, SUMS_FILE: file_sha256(folder / SUMS_FILE)}


def _published_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """bundle.json as published: without `sources`, which are paths on the training machine.

    The sha256 entries (what load_bundle checks) cover only the weights, so they still hold.
    """
    return {k: v for k, v in meta.items() if k != "sources"}


def _check_weights(bundle_dir: Path, meta: dict[str, Any]) -> None:
    """Refuse to publish weights that do not match the sha256 bundle.json recorded at export."""
    for name in (CODEC_FILE, S2S_FILE):
        path = bundle_dir / name
        if not path.is_file():
            raise PublishError(f"{bundle_dir} is not a complete bundle: {name} is missing")
        if meta.get("sha256", {}).get(name) != file_sha256(path):
            raise PublishError(f"{path} does not match the sha256 in {META_FILE}: corrupt or replaced, not publishing")


def stage_repos(bundle_dir: Path, cfg: PublishConfig, out_dir: Path, namespace: str | None = None) -> dict[str, Path]:
    """Write the codec/ and s2s/ repo folders under `out_dir`; each is built aside and renamed in.

    `namespace` only fills in the repo ids the model cards link to (cfg.namespace, else a placeholder).
    """
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    try:
        meta = read_meta(bundle_dir)
    except BundleError as exc:
        raise PublishError(str(exc)) from None
    _check_weights(bundle_dir, meta)
    states = {kind: torch.load(bundle_dir / name, map_location="cpu", weights_only=True)
              for kind, name in WEIGHTS.items()}
    configs = {"codec": dict(states["codec"]["config"]),
               "s2s": {**states["s2s"]["config"], "codec_config": states["s2s"]["codec_config"]}}
    params = {kind: sum(t.numel() for t in state["model"].values() if torch.is_tensor(t))
              for kind, state in states.items()}
    ids = repo_ids(cfg, namespace)
    staged = {}
    for kind, weights in WEIGHTS.items():
        with atomic.atomic_dir(out_dir / kind) as tmp:
            shutil.copyfile(bundle_dir / weights, tmp / weights)
            (tmp / CONFIG_FILE).write_text(json.dumps(configs[kind], indent=2, default=str) + "\n", encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(_published_meta(meta), indent=2, default=str) + "\n",
                                         encoding="utf-8")
            (tmp / CARD_FILE).write_text(model_card(kind, meta, cfg, configs, params, ids), encoding="utf-8")
            write_sums(tmp)
        staged[kind] = out_dir / kind
    return staged


# -- model card -----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, default=str) + "`"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _front_matter(kind: str, cfg: PublishConfig) -> str:
    """The YAML block the Hub reads: licence, language, tags, library."""
    tags = ["telugu", "speech", "audio", "pytorch"]
    tags += ["neural-audio-codec", "audio-tokenizer"] if kind == "codec" else ["speech-to-speech", "spoken-dialogue"]
    data = {"license": cfg.license, "language": ["te"], "library_name": "pytorch", "tags": tags,
            "pipeline_tag": "audio-to-audio"}
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n"


def _gate_verdict(gates: Any) -> str:
    if not isinstance(gates, dict) or not gates:
        return "bundle.json records no gate results."
    passed = all((g.get("passed") if isinstance(g, dict) else g) for g in gates.values())
    return ("Every release gate passed." if passed else
            "**Not every release gate passed** (FAIL below): this is not a released candidate.")


def _gate_rows(gates: dict[str, Any]) -> list[str]:
    rows = ["| gate | check | value | rule | result |", "|---|---|---|---|---|"]
    for name, gate in gates.items():
        if isinstance(gate, dict) and isinstance(gate.get("checks"), list):
            for check in gate["checks"]:
                rule = f"{check.get('op', '')} {_fmt(check.get('threshold'))}".strip()
                rows.append(f"| {name} | {_fmt(check.get('metric'))} | {_fmt(check.get('value'))} | {rule} | "
                            f"{'pass' if check.get('passed') else 'FAIL'} |")
        else:
            passed = gate.get("passed") if isinstance(gate, dict) else gate
            rows.append(f"| {name} | (all) | — | — | {'pass' if passed else 'FAIL'} |")
    return rows


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    """One row per figure; nested figures (codec_baselines: name -> metrics) get dotted names."""
    rows = ["| stage | metric | value |", "|---|---|---|"]

    def flat(prefix: str, values: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        for key, value in values.items():
            if isinstance(value, dict):
                yield from flat(f"{prefix}{key}.", value)
            elif isinstance(value, (int, float, str, bool)) or value is None:
                yield f"{prefix}{key}", value

    for stage, values in metrics.items():
        if isinstance(values, dict):
            rows += [f"| {stage} | {key} | {_fmt(value)} |" for key, value in flat("", values)]
        else:
            rows.append(f"| {stage} | — | {_fmt(values)} |")
    return rows


def _what_it_is(kind: str, configs: dict[str, dict[str, Any]], params: dict[str, int]) -> list[str]:
    codec = configs["codec"]
    hop = math.prod(codec.get("strides", [320]))
    rate = codec.get("sample_rate", 16000)
    bitrate = rate / hop * codec.get("n_codebooks", 0) * math.log2(max(codec.get("codebook_size", 2), 2))
    if kind == "codec":
        return [
            "TeluCodec is a streaming neural audio codec for Telugu speech: a convolutional encoder, a residual "
            "vector quantizer and a mirrored decoder. It turns 16 kHz mono speech into discrete codes and back; "
            "the companion S2S model speaks in these codes.", "",
            f"- sample rate {rate} Hz, hop {hop} samples ({rate / hop:g} frames/s)",
            f"- {codec.get('n_codebooks')} codebooks x {codec.get('codebook_size')} codes: {bitrate:,.0f} bit/s",
            f"- {params['codec']:,} parameters; the full configuration is in `config.json`",
        ]
    s2s = configs["s2s"]
    return [
        "A decoder-only transformer that answers Telugu speech with Telugu speech, directly in TeluCodec codes "
        "(no text in between): it reads the user's turn as codec tokens and generates the reply's tokens with "
        "the codebooks delayed one step each, in a chosen voice (speaker and emotion). The companion codec "
        "turns the tokens back into audio.", "",
        f"- d_model {s2s.get('d_model')}, layers {s2s.get('n_layers')}, heads {s2s.get('n_heads')}, "
        f"context {s2s.get('max_len')} positions",
        f"- vocabulary: {s2s.get('n_codebooks')} codebooks x {s2s.get('codebook_size')} codes ({bitrate:,.0f} bit/s codec)",
        f"- {s2s.get('n_speakers')} speakers, {s2s.get('n_emotions')} emotions",
        f"- {params['s2s']:,} parameters; `config.json` has its configuration and the codec's (`codec_config`)",
    ]


def _limits(meta: dict[str, Any]) -> list[str]:
    profile = meta.get("profile", "?")
    corpus = ("the embedded synthetic corpus: Telugu conversations spoken by espeak-ng (a formant synthesizer, "
              "robotic voices; its variants stand in for 4 speakers and prosody settings for 9 emotions), "
              "a few minutes of audio" if profile == "smoke" else
              "the corpus named by the DVC hash above; unless the run was given a list of real recordings, "
              "that is the same espeak-ng synthetic Telugu corpus, at a larger size")
    lines = [
        f"- Trained in the `{profile}` profile on {corpus}. It has not heard natural human speech unless the "
        "corpus above says so, and will not generalize to it; the figures above describe that corpus only.",
        "- Telugu only, 16 kHz mono. The synthetic corpus holds a small set of scripted dialogues; replies may "
        "be wrong, repetitive or unintelligible, and nothing filters them.",
        "- The gates are this project's release thresholds (its params.yaml), not a public benchmark.",
    ]
    if profile == "smoke":
        lines.insert(0, "- **Smoke profile: a pipeline test artifact, tiny and undertrained. Not for use.**")
    return lines


def model_card(kind: str, meta: dict[str, Any], cfg: PublishConfig, configs: dict[str, dict[str, Any]],
               params: dict[str, int], ids: dict[str, str]) -> str:
    """README.md of one repo: front matter, then what it is, evaluation, data, limits, licence, usage."""
    name = meta.get("model_name", "telugu-s2s")
    version = meta.get("version")
    title = f"{name} — {'TeluCodec (codec)' if kind == 'codec' else 'speech-to-speech model'}"
    other = "s2s" if kind == "codec" else "codec"
    link = ids[other] if "<" in ids[other] else f"[{ids[other]}]({hub_endpoint(cfg)}/{ids[other]})"
    corpus = meta.get("corpus") if isinstance(meta.get("corpus"), dict) else {}
    provenance = [f"- corpus (DVC hash): `{meta.get('corpus_hash', corpus.get('hash', 'unknown'))}`",
                  *(f"- corpus {key}: {_fmt(value)}" for key, value in corpus.items() if key != "hash"),
                  f"- profile: `{meta.get('profile', '?')}`", f"- code: git commit `{meta.get('git_commit', '?')}`",
                  *(f"- {key}: `{meta[key]}`" for key in ("train_run_id", "codec_run_id", "s2s_run_id")
                    if meta.get(key)),
                  f"- weights sha256: `{meta.get('sha256', {}).get(WEIGHTS[kind], '?')}`"]
    lines = [
        _front_matter(kind, cfg),
        f"# {title}" + (f" v{version}" if version else ""), "",
        f"Half of a pair: this repo holds the {'codec' if kind == 'codec' else 'S2S model'}; "
        f"{link} holds the {'S2S model' if other == 's2s' else 'codec'}. "
        "Both come from one bundle of the Telugu speech-to-speech pipeline and only work together.", "",
        "## What it is", "", *_what_it_is(kind, configs, params), "",
        "## Evaluation", "",
        "Measured by the training pipeline on held-out splits of its corpus (latency: first audio after the end "
        "of an utterance, through the streaming session). " + _gate_verdict(meta.get("gates")), "",
        *(_gate_rows(meta["gates"]) if meta.get("gates") else ["No gate results in bundle.json."]), "",
        *(_metric_rows(meta["metrics"]) if meta.get("metrics") else ["No metrics in bundle.json."]), "",
        "## Training data", "", *provenance, "",
        "## Limitations", "", *_limits(meta), "",
        "## Licence", "",
        f"`{cfg.license}` (see the front matter). The weights were trained on the corpus above; check that its "
        "sources allow your use.", "",
        "## Usage", "",
        "Loading needs this project's code (`serving/`, `models/`); the weights load with "
        "`torch.load(weights_only=True)`, no pickled code. For a private repo, log in first (`hf auth login`).", "",
        "```python",
        "from pathlib import Path",
        "from huggingface_hub import hf_hub_download",
        "from serving.bundle import load_bundle",
        "",
        'folder = Path("telugu-s2s-bundle")',
        f'hf_hub_download("{ids["codec"]}", "{CODEC_FILE}", local_dir=folder)',
        f'for name in ("{S2S_FILE}", "{META_FILE}"):',
        f'    hf_hub_download("{ids["s2s"]}", name, local_dir=folder)',
        "bundle = load_bundle(folder)  # checks both weights against the sha256 in bundle.json",
        "print(bundle.sample_rate, bundle.meta[\"model_name\"])",
        "```", "",
        f"`{SUMS_FILE}` lists the sha256 of every file here: `sha256sum -c {SUMS_FILE}`.", "",
    ]
    return "\n".join(lines)


# -- talking to the Hub -----------------------------------------------------------------------


def _xet_offered(endpoint: str, repo_id: str, token: str) -> bool:
    """Whether uploads can go through Xet: hf_xet installed and enabled, and the server hands out a
    Xet write token for the repo (the Hub does; a server without Xet storage answers 4xx)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    if constants.HF_HUB_DISABLE_XET or importlib.util.find_spec("hf_xet") is None:
        return False
    try:
        response = get_session().get(f"{endpoint}/api/models/{repo_id}/xet-write-token/main",
                                     headers=build_hf_headers(token=token))
    except Exception:  # unreachable now: the upload will say so with a clearer message
        return False
    return response.status_code == 200 and constants.HUGGINGFACE_HEADER_X_XET_ENDPOINT in response.headers


@contextmanager
def _plain_http_uploads(enabled: bool) -> Iterator[None]:
    """Make huggingface_hub upload without Xet for the block (classic LFS over HTTP).

    is_xet_available() reads constants.HF_HUB_DISABLE_XET on every call, so setting it for the
    block is enough; the lock keeps two publishes in one process from restoring it under each other.
    """
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    with _XET_LOCK:
        saved = constants.HF_HUB_DISABLE_XET
        constants.HF_HUB_DISABLE_XET = True
        try:
            yield
        finally:
            constants.HF_HUB_DISABLE_XET = saved


def _verify_remote(api: Any, repo: RepoReport, token: str) -> None:
    """Download every file of the commit just made into a fresh cache and check its sha256.

    A fresh cache means nothing is served from an earlier download; the expected digests are the
    staged SHA256SUMS (and SHA256SUMS's own digest), so a file changed anywhere on the way fails.
    """
    listed = set(_hub_call(f"listing {repo.repo_id}", token, api.list_repo_files, repo.repo_id, revision=repo.commit))
    missing = sorted(set(repo.files) - listed)
    if missing:
        raise PublishError(f"{repo.repo_id}@{repo.commit} lacks {', '.join(missing)} after the upload")
    bad = []
    with tempfile.TemporaryDirectory(prefix="hub-verify-") as cache:
        for name, expected in sorted(repo.files.items()):
            path = _hub_call(f"downloading {name} from {repo.repo_id}", token, api.hf_hub_download, repo.repo_id,
                             name, revision=repo.commit, cache_dir=cache)
            got = file_sha256(Path(path))
            if got != expected:
                bad.append(f"{name} (sha256 {got}, expected {expected})")
    if bad:
        raise PublishError(f"{repo.repo_id}@{repo.commit}: downloaded back, {'; '.join(bad)} did not match "
                           f"{SUMS_FILE}: the Hub does not hold what was uploaded")
    repo.verified = True


def _ensure_repo(api: Any, repo_id: str, cfg: PublishConfig, token: str) -> tuple[str, bool]:
    """Create the repo (or reuse it) and return its URL and whether it is private.

    An existing public repo is refused while publish.private is true: reusing a repo must not
    publish weights the settings say are private.
    """
    url = _hub_call(f"creating repo {repo_id}", token, api.create_repo, repo_id, private=cfg.private, exist_ok=True)
    info = _hub_call(f"reading repo {repo_id}", token, api.repo_info, repo_id)
    private = bool(info.private)
    if cfg.private and not private:
        raise PublishError(f"{repo_id} already exists and is public, but publish.private is true: not uploading. "
                           "Make the repo private on the Hub, or set publish.private=false")
    return str(url), private


def _upload(api: Any, repo: RepoReport, message: str, token: str) -> None:
    info = _hub_call(f"uploading {repo.local_dir} to {repo.repo_id}", token, api.upload_folder,
                     repo_id=repo.repo_id, folder_path=repo.local_dir, commit_message=message)
    repo.commit, repo.commit_url = info.oid, info.commit_url
    log.info("%s: commit %s", repo.repo_id, info.oid)


def _push(bundle_dir: Path, cfg: PublishConfig, out_dir: Path, token: str, report: PublishReport) -> None:
    """The hub path: namespace, staging with the real repo ids, repos, upload, read-back check."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=report.endpoint, token=token)
    user = _hub_call(f"checking the token in ${cfg.token_env} against {report.endpoint}", token, api.whoami)
    namespace = cfg.namespace or user["name"]
    staged = stage_repos(bundle_dir, cfg, out_dir, namespace=namespace)
    ids = repo_ids(cfg, namespace)
    report.repos = [RepoReport(kind, str(folder), verify_folder(folder), repo_id=ids[kind])
                    for kind, folder in staged.items()]
    for repo in report.repos:
        repo.url, repo.private = _ensure_repo(api, repo.repo_id, cfg, token)
    xet = _xet_offered(report.endpoint, report.repos[0].repo_id, token)
    report.transport = "xet" if xet else "http"
    version = f" v{report.version}" if report.version else ""
    commit_message = f"Publish {report.model_name}{version} (bundle {report.bundle_sha[:12]})"
    with _plain_http_uploads(not xet):
        for repo in report.repos:
            log.info("uploading %s to %s (%s)", repo.local_dir, repo.repo_id, report.transport)
            _upload(api, repo, commit_message, token)
    for repo in report.repos:
        _verify_remote(api, repo, token)
    report.verified = True


def publish_bundle(bundle_dir: Path, cfg: PublishConfig, root_out_dir: Path, token: str | None = None) -> PublishReport:
    """Stage both repos under `root_out_dir` and, with a token, publish and verify them.

    `token` defaults to the variable cfg.token_env names. Without one (or with publishing disabled,
    or huggingface_hub in offline mode) the report's mode is "local" and its message says why and
    where the folders are. Any failure writes a "failed" publish.json, then raises PublishError.
    """
    bundle_dir, out_dir = Path(bundle_dir), Path(root_out_dir)
    token = (token or os.environ.get(cfg.token_env) or "").strip() or None
    meta = read_meta(bundle_dir)
    report = PublishReport(mode="local", message="", bundle_dir=str(bundle_dir), out_dir=str(out_dir),
                           model_name=str(meta.get("model_name", "telugu-s2s")),
                           version=None if meta.get("version") is None else str(meta["version"]),
                           bundle_sha=bundle_sha(bundle_dir), endpoint=hub_endpoint(cfg), token_env=cfg.token_env)
    try:
        reason = _local_reason(cfg, token)
        if reason is None:
            with _redacted_logs(token):
                _push(bundle_dir, cfg, out_dir, token, report)  # type: ignore[arg-type]
            report.mode = "hub"
            report.message = (f"published {report.model_name} to " +
                              " and ".join(f"{r.url} (commit {r.commit[:12] if r.commit else '?'})" for r in report.repos)
                              + f", downloaded back and verified; local copy in {out_dir}")
        else:
            staged = stage_repos(bundle_dir, cfg, out_dir)
            report.repos = [RepoReport(kind, str(folder), verify_folder(folder)) for kind, folder in staged.items()]
            report.message = (f"{reason}, so nothing was uploaded: the model repos were written to "
                              f"{out_dir / 'codec'} and {out_dir / 's2s'}")
    except PublishError as exc:
        report.mode, report.message, report.verified = "failed", redact(str(exc), token), False
        atomic.write_json(out_dir / REPORT_FILE, asdict(report))
        log.error("publish failed: %s", report.message)
        raise
    atomic.write_json(out_dir / REPORT_FILE, asdict(report))
    log.info("%s", report.message)
    return report


def _local_reason(cfg: PublishConfig, token: str | None) -> str | None:
    """Why this publish stays local, in words; None when it goes to the Hub."""
    from huggingface_hub import constants

    if not cfg.enabled:
        return "publishing is disabled (publish.enabled is false)"
    if token is None:
        return (f"no Hugging Face token: the environment variable {cfg.token_env} is not set "
                f"(set it to a write token to publish to {hub_endpoint(cfg)})")
    if constants.is_offline_mode():
        return f"huggingface_hub is in offline mode (HF_HUB_OFFLINE is set); unset it to publish with ${cfg.token_env}"
    return None


__all__ = ["PublishError", "PublishReport", "RepoReport", "hub_endpoint", "model_card", "publish_bundle",
           "read_sums", "redact", "repo_ids", "stage_repos", "verify_folder", "write_sums"]
