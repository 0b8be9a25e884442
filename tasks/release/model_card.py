"""Publishing: the model card (README.md) of each Hub repo, from the bundle's metadata: what the
model is, its gates and figures, its limits and how to load it. Text only; nothing here reads
files or talks to the Hub."""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import yaml

from core.config import PublishConfig
from serving.bundle import CODEC_FILE, META_FILE, S2S_FILE
from tasks.release.hub_repos import SUMS_FILE, WEIGHTS, hub_endpoint




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
