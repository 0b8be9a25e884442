"""The comparison section of the sign-off report: this version's measured figures beside the
published figures of the peers a reviewer names (tasks/release/peers.yaml, each with its source
and date). A figure no source gave reads "not published"; the reading column says "lower" or
"higher" only where both sides have a number for the same figure, and names what differs in how
it was measured, so nothing is claimed that a figure does not show.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import yaml

from tasks.release.inference_cost import Capacity

PEERS_FILE = Path(__file__).with_name("peers.yaml")
NOT_PUBLISHED = "not published"

# (key, figure) in the order of the table
ROWS: list[tuple[str, str]] = [
    ("first_audio_1", "first audio, 1 session (p50 / p95)"),
    ("first_audio_100", "first audio, 100 sessions (p50 / p95)"),
    ("speakers", "speakers working"),
    ("emotions", "emotions working"),
    ("intelligibility", "intelligibility (1 - CER of replies against their own text)"),
    ("mos", "MOS (DNSMOS P.808) of replies / of its training corpus"),
    ("cost_user_hour", "inference cost per user-hour"),
    ("training", "training cost"),
    ("languages", "languages"),
]


def load_peers(path: Path = PEERS_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    for peer, figures in data["peers"].items():
        for key, figure in figures.items():
            if figure.get("source") not in data["sources"]:
                raise ValueError(f"{path}: {peer} {key} cites unknown source {figure.get('source')!r}")
            if key not in dict(ROWS):
                raise ValueError(f"{path}: {peer} has unknown figure {key!r}: one of {', '.join(dict(ROWS))}")
    return data


def _ms(figures: dict[str, float] | None) -> str | None:
    if not figures or "p95" not in figures:
        return None
    return f"{figures.get('p50', float('nan')):.0f} / {figures['p95']:.0f} ms"


def our_figures(figure: Callable[[str], float | None], quality: dict[str, Any] | None, capacity: Capacity,
                cost: dict[str, Any] | None) -> dict[str, str | None]:
    """This version's figures as table cells (None: not measured)."""
    def share(dotted: str, of: int) -> str | None:
        value = figure(dotted)
        return None if value is None else f"{value:.0f} of {of}"

    corpus_mos = ((quality or {}).get("sets", {}).get("corpus", {}) or {}).get("dnsmos_p808")
    reply_mos = figure("quality.replies.dnsmos_p808")
    intelligibility = figure("quality.replies.intelligibility")
    training = figure("cost.total_usd")
    return {
        "first_audio_1": _ms(capacity.first_audio_ms.get(1)),
        "first_audio_100": _ms(capacity.first_audio_ms.get(100)),
        "speakers": share("quality.replies.speakers_working", 4),
        "emotions": share("quality.replies.emotions_working", 9),
        "intelligibility": None if intelligibility is None else f"{intelligibility:.1%}",
        "mos": None if reply_mos is None else f"{reply_mos:.2f} / "
                                              f"{'—' if corpus_mos is None else f'{corpus_mos:.2f}'}",
        "cost_user_hour": None if cost is None else f"${cost['usd_per_user_hour_full']:.4f} (CPU)",
        "training": None if training is None else f"${training:.2f}",
        "languages": "Telugu",
    }


def _number_ms(text: str) -> float | None:
    """The smallest figure in milliseconds a cell states ('232 ms at best, 320 ms' -> 232)."""
    found = [float(n) for n in re.findall(r"(\d+(?:\.\d+)?)\s*ms", text)]
    return min(found) if found else None


def reading(key: str, ours: str | None, peer_cells: list[str | None]) -> str:
    """What the row shows, only where figures on both sides allow it."""
    published = [p for p in peer_cells if p]
    if ours is None:
        return "not measured here"
    if not published:
        return "no peer published this figure"
    if key == "first_audio_1":
        our_p95 = _number_ms(ours.split("/")[-1])
        theirs = [n for n in (_number_ms(p) for p in published) if n is not None]
        if our_p95 is not None and theirs:
            verdict = "lower than" if our_p95 < min(theirs) else "not lower than"
            return (f"our p95 is {verdict} every published figure, but not the same test: ours is a small "
                    "model on one CPU thread, end of utterance to first frame; theirs are large models "
                    "that answer in substance")
    return "not comparable figures: see the notes"


def comparison_section(figure: Callable[[str], float | None], quality: dict[str, Any] | None, capacity: Capacity,
                       cost: dict[str, Any] | None, peers: dict[str, Any] | None = None) -> list[str]:
    """The markdown of the comparison: a table, its notes and the sources with their dates."""
    peers = peers or load_peers()
    names = list(peers["peers"])
    ours = our_figures(figure, quality, capacity, cost)
    cited: list[str] = []
    notes: list[str] = []

    def cell(peer: str, key: str) -> str | None:
        entry = peers["peers"][peer].get(key)
        if not entry:
            return None
        if entry["source"] not in cited:
            cited.append(entry["source"])
        ref = cited.index(entry["source"]) + 1
        if entry.get("note"):
            notes.append(f"{peer}, {dict(ROWS)[key]}: {entry['note']} [{ref}]")
        return f"{entry['value']} [{ref}]"

    lines = ["", "## Comparison with published peers", "",
             f"This version's measured figures beside what the peers published (read {peers['retrieved']}). "
             f"\"{NOT_PUBLISHED}\": no figure found in the sources searched. Latency here is the load test's "
             f"({capacity.source}).", "",
             "| figure | this model | " + " | ".join(names) + " | reading |", "|---" * (len(names) + 3) + "|"]
    for key, label in ROWS:
        cells = [cell(peer, key) for peer in names]
        lines.append(f"| {label} | {ours[key] or 'not measured'} | "
                     + " | ".join(c or NOT_PUBLISHED for c in cells) + f" | {reading(key, ours[key], cells)} |")
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    lines += ["", "Sources:", ""]
    for i, key in enumerate(cited, 1):
        source = peers["sources"][key]
        lines.append(f"{i}. {source['title']}, {source['date']}: {source['url']} (read at {source['read_at']})")
    return lines
