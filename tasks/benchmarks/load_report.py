"""The load test's report: docs/benchmarks.md (one section function each, markdown tables from one
table helper), the goals and the batching ratio it states, the machine it ran on, and the same
figures as rich tables."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from core import atomic

GOAL_SESSIONS = 100  # the goals are stated at 1 and 100 sessions


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, memory, OS, Python and torch versions of this machine."""
    from importlib import metadata

    info: dict[str, Any] = {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                            "memory_gb": None, "os": platform.platform(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024 ** 2, 1)
    except (OSError, ValueError):
        pass
    try:
        info["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        info["torch"] = None
    return info


def _run(results: list[dict[str, Any]], sessions: int, batching: bool, levers: str = "on") -> dict[str, Any] | None:
    """The back-to-back run of `sessions` with batching (and the engine's levers) on or off."""
    found = [r for r in results if r.get("clients") == sessions and r.get("batching") is batching
             and r.get("profile", "back-to-back") == "back-to-back" and r.get("levers", "on") == levers]
    return found[-1] if found else None


def evaluate_goals(results: list[dict[str, Any]], capacity: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issue's goals against the back-to-back runs with batching on: met, missed or not
    measured; with a capacity search, its figure as a last line."""
    goals = []

    def goal(name: str, run: dict[str, Any] | None, measured: Callable[[dict[str, Any]], tuple[str, bool]]) -> None:
        if run is None:
            goals.append({"goal": name, "measured": "not measured", "status": "not measured"})
            return
        text, met = measured(run)
        status = "not measured" if text == "not measured" else "met" if met else "missed"
        goals.append({"goal": name, "measured": text, "status": status})

    def no_errors(run: dict[str, Any]) -> tuple[str, bool]:
        text = (f"{run['errors']} errors, {run['dropped']} dropped, "
                f"{run['turns_completed']}/{run['turns_planned']} turns")
        return text, run["errors"] == 0 and run["dropped"] == 0 and run["turns_completed"] == run["turns_planned"]

    def latency(key: str, limit: float) -> Callable[[dict[str, Any]], tuple[str, bool]]:
        def measured(run: dict[str, Any]) -> tuple[str, bool]:
            value = run["latency_ms"][key]
            return ("no completed turn", False) if value is None else (f"{value:.1f} ms", value < limit)
        return measured

    def no_gaps(run: dict[str, Any]) -> tuple[str, bool]:
        playback = run.get("playback")
        if not playback or not playback.get("replies"):
            return "not measured", False
        return (f"{playback['with_gap']}/{playback['replies']} replies with a gap "
                f"({playback['gap_total_s']:.2f} s in all)", playback["with_gap"] == 0)

    one, many = _run(results, 1, True), _run(results, GOAL_SESSIONS, True)
    goal(f"0 errors at {GOAL_SESSIONS} sessions", many, no_errors)
    goal("p95 < 150 ms at 1 session", one, latency("p95", 150.0))
    goal(f"p95 < 300 ms at {GOAL_SESSIONS} sessions", many, latency("p95", 300.0))
    goal("std < 20 ms at 1 session", one, latency("std", 20.0))
    goal(f"no reply with a playback gap at {GOAL_SESSIONS} sessions", many, no_gaps)
    if capacity is not None:
        goals.append({"goal": f"capacity >= {GOAL_SESSIONS} sessions",
                      "measured": f"{capacity['sessions']} sessions ({capacity['sessions_per_core']:.1f} per core)",
                      "status": "met" if capacity["sessions"] >= GOAL_SESSIONS else "missed"})
    return goals


def batching_ratio(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Latency with batching off / on at the largest session count measured both ways."""
    both = sorted({r["clients"] for r in results if r.get("batching") is False}
                  & {r["clients"] for r in results if r.get("batching") is True})
    if not both:
        return None
    sessions = both[-1]
    on, off = _run(results, sessions, True), _run(results, sessions, False)
    ratio = {"sessions": sessions}
    for key in ("p95", "mean"):
        a, b = on["latency_ms"][key], off["latency_ms"][key]
        ratio[f"{key}_on_ms"], ratio[f"{key}_off_ms"] = a, b
        ratio[f"{key}_ratio"] = b / a if a and b is not None else None
    rtf_on, rtf_off = on.get("reply_rtf_median"), off.get("reply_rtf_median")
    ratio["rtf_on"], ratio["rtf_off"] = rtf_on, rtf_off
    return ratio


def levers_ratio(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Latency and playback gaps with the engine's levers off / on, at the largest count run both ways."""
    off = {r["clients"] for r in results if r.get("levers") == "off" and r.get("batching") is True}
    on = {r["clients"] for r in results if r.get("levers", "on") == "on" and r.get("batching") is True
          and r.get("profile", "back-to-back") == "back-to-back"}
    both = sorted(off & on)
    if not both:
        return None
    sessions = both[-1]
    a, b = _run(results, sessions, True), _run(results, sessions, True, "off")
    ratio: dict[str, Any] = {"sessions": sessions}
    for key in ("p50", "p95", "mean"):
        x, y = a["latency_ms"][key], b["latency_ms"][key]
        ratio[f"{key}_on_ms"], ratio[f"{key}_off_ms"] = x, y
        ratio[f"{key}_ratio"] = y / x if x and y is not None else None
    ratio["gaps_on"], ratio["gaps_off"] = ((r.get("playback") or {}).get("with_gap") for r in (a, b))
    ratio["rtf_on"], ratio["rtf_off"] = a.get("reply_rtf_median"), b.get("reply_rtf_median")
    ratio["tick_on"], ratio["tick_off"] = a.get("tick_ms"), b.get("tick_ms")
    return ratio


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MiB"


def md_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> list[str]:
    """A markdown table as lines: `header`, then one line per row; `align` is one character per
    column, "l" (---) or "r" (---:), all "l" by default."""
    marks = {"l": "---", "r": "---:"}
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [line(header), "|" + "|".join(marks[a] for a in (align or "l" * len(header))) + "|",
            *(line(r) for r in rows)]


def _machine_section(machine: dict[str, Any]) -> list[str]:
    return ["## Machine", "",
            *md_table(["cores", "CPU", "memory", "OS", "Python", "torch"],
                      [[machine.get("cores"), machine.get("cpu"), f"{machine.get('memory_gb')} GB", machine.get("os"),
                        machine.get("python"), machine.get("torch")]]), "",
            "The load generator (one asyncio process) ran on the same machine as the server.", ""]


def _model_section(model: dict[str, Any], serving: dict[str, Any] | None) -> list[str]:
    lines = ["## Model", "", f"- uri: `{model.get('uri')}`",
             f"- name / version: {model.get('model_name')} / {model.get('version')}",
             f"- git commit: {model.get('git_commit')}; corpus hash: {model.get('corpus_hash')}"]
    if serving:
        lines.append("- serving: " + ", ".join(f"{k}={v}" for k, v in serving.items()))
    return lines


def _load_section(results: list[dict[str, Any]], utterances: str | None) -> list[str]:
    settings = next((r.get("settings") for r in results if r.get("settings")), {}) or {}
    how = (f"Utterances: {utterances or 'user turns'}. Each session streams them as 16-bit PCM in "
           f"{settings.get('chunk_ms', 20)} ms chunks, "
           + ("paced in real time" if settings.get("realtime", True) else "as fast as the socket takes them")
           + f", ends each with end_of_utterance (VAD: {settings.get('vad', 'client')}) and reads the reply "
           "to reply_end" + (", listening to it before the next turn" if settings.get("listen") else "")
           + ". Client starts are staggered over "
           f"{settings.get('start_spread_s', '?')} s. Latency: on the client, end_of_utterance sent -> first "
           "reply audio frame received (ms); server p95: the same measured inside the server. RTF: reply audio "
           "seconds / wall seconds from end_of_utterance to reply_end (median). Client lag: how late the paced "
           "chunks left at worst (p99; a large value means the load generator itself was saturated).")
    rows = []
    for r in results:
        lat = r["latency_ms"]
        planned = r["turns_planned"] if r.get("turns_planned") is not None else "?"
        rows.append([r["clients"], {True: "on", False: "off"}.get(r.get("batching"), "?"),
                     f"{r['turns_completed']}/{planned}", r["errors"], r["dropped"],
                     *(_ms(lat[k]) for k in ("mean", "p50", "p95", "p99", "std")), _num(r.get("reply_rtf_median")),
                     _ms(r.get("server_latency_ms", {}).get("p95")), _ms((r.get("send_lag_ms") or {}).get("p99")),
                     _mb(r.get("server_rss_mb")), *_gap_cells(r.get("playback")), r.get("profile", "back-to-back"),
                     r.get("levers", "on")])
    lines = ["", "## Load", "", how, "", _PLAYBACK_HOW.format(buffer=settings.get("playback_buffer_ms") or 0), "",
             *md_table(["sessions", "batching", "turns", "errors", "dropped", "mean", "p50", "p95", "p99", "std",
                        "reply RTF", "server p95", "client lag p99", "server RSS", "replies with a gap",
                        "gap s (max)", "profile", "levers"], rows, "rlrrrrrrrrrrrrrrll")]
    think = next((r.get("settings", {}).get("think") for r in results if r.get("profile") == "conversational"), None)
    if think:
        lines += ["", f"Conversational profile: as back-to-back, plus a {think}."]
    problems = [(r, code, n) for r in results for code, n in {**r.get("error_codes", {}),
                                                               **r.get("drop_reasons", {})}.items()]
    if problems:
        lines += ["", "Errors and dropped sessions by cause:", ""]
        lines += [f"- {r['clients']} sessions, batching {'on' if r.get('batching') else 'off'}: {code} x{n}"
                  for r, code, n in problems]
    return lines


_PLAYBACK_HOW = ("Playback gap: from the arrival time of every reply frame, the seconds a real-time player "
                 "(starting {buffer:g} ms after the first frame, then playing each frame's samples in turn) would "
                 "have had nothing to play; a reply with any gap stutters. Levers: the engine's deadline "
                 "scheduling, chunked encoding and precision as configured (on) or all off "
                 "(serving.ahead_ms=0, encode_hops=1, precision=fp32). With deadline scheduling a reply is "
                 "sent about as fast as it plays (plus serving.ahead_ms), so its RTF is near 1 by design; "
                 "the playback gap says whether it kept up.")


def _gap_cells(playback: dict[str, Any] | None) -> list[str]:
    if not playback or not playback.get("replies"):
        return ["-", "-"]
    return [f"{playback['with_gap']}/{playback['replies']} ({playback['share_with_gap'] * 100:.0f} %)",
            _num(playback["gap_s"]["max"])]


def _goals_section(results: list[dict[str, Any]], capacity: dict[str, Any] | None = None) -> list[str]:
    rows = [[g["goal"], g["measured"], {"met": "met", "missed": "**missed**"}.get(g["status"], g["status"])]
            for g in evaluate_goals(results, capacity)]
    return ["", "## Goals", "", *md_table(["goal", "measured", "status"], rows)]


def _capacity_section(capacity: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Capacity", ""]
    if not capacity:
        return lines + ["Not searched (--capacity-probes 0)."]
    lines += [f"**{capacity['sessions']} sessions on {capacity['cores']} cores: "
              f"{capacity['sessions_per_core']:.1f} sessions per core** (the largest count with {capacity['rule']}; "
              f"failed at {capacity['failed_at'] if capacity['failed_at'] is not None else 'no count tried'}, "
              f"search ceiling {capacity['ceiling']}). Probes beyond the runs above:", ""]
    rows = [[t["sessions"], "pass" if t["passed"] else "fail", _ms(t["p95_ms"]), t["with_gap"], t["why"] or "-"]
            for t in capacity["probes"]]
    return lines + (md_table(["sessions", "result", "p95 ms", "replies with a gap", "why"], rows, "rlrrl")
                    if rows else ["(none: the runs above already bracket it)"])


def _tick_section(results: list[dict[str, Any]]) -> list[str]:
    rows = [[r["clients"], r.get("profile", "back-to-back"), {True: "on", False: "off"}.get(r.get("batching"), "?"),
             r.get("levers", "on"), *(_ms(r["tick_ms"][k]) for k in ("encode", "step", "decode", "other", "total")),
             r["tick_ms"]["ticks"]] for r in results if r.get("tick_ms")]
    if not rows:
        return []
    return ["", "## Engine ticks under load", "",
            "Mean milliseconds per engine tick inside the server during each run, by part: encode (user audio), "
            "step (S2S logits, sampling, KV step), decode (codec decoder), other (commands, scheduling, delivery).",
            "", *md_table(["sessions", "profile", "batching", "levers", "encode", "step", "decode", "other", "total",
                           "ticks"], rows, "rlllrrrrrr")]


def _levers_section(ratio: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Engine levers on vs off", ""]
    if ratio is None:
        return lines + ["Not measured (no run with the levers off: --compare-levers 0)."]
    gaps = lambda v: "-" if v is None else str(v)  # noqa: E731
    return lines + [f"At {ratio['sessions']} sessions, the same model and load, the levers as configured vs all off "
                    "(off / on: how many times longer callers wait without them):", "",
                    *md_table(["figure", "levers on", "levers off", "off / on"], [
                        *[[k, f"{_ms(ratio[f'{k}_on_ms'])} ms", f"{_ms(ratio[f'{k}_off_ms'])} ms",
                           f"{_num(ratio[f'{k}_ratio'])}x"] for k in ("p50", "p95", "mean")],
                        ["replies with a gap", gaps(ratio["gaps_on"]), gaps(ratio["gaps_off"]), ""],
                        ["reply RTF (median)", _num(ratio["rtf_on"]), _num(ratio["rtf_off"]), ""]], "lrrr")]


def _batching_section(ratio: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Batching on vs off", ""]
    if ratio is None:
        return lines + ["Not measured (no run with batching off at a session count also run with batching on)."]
    return lines + [f"At {ratio['sessions']} sessions (off / on: how many times longer callers wait without "
                    "cross-session batching):", "",
                    *md_table(["latency", "batching on", "batching off", "off / on"], [
                        ["p95", f"{_ms(ratio['p95_on_ms'])} ms", f"{_ms(ratio['p95_off_ms'])} ms",
                         f"{_num(ratio['p95_ratio'])}x"],
                        ["mean", f"{_ms(ratio['mean_on_ms'])} ms", f"{_ms(ratio['mean_off_ms'])} ms",
                         f"{_num(ratio['mean_ratio'])}x"],
                        ["reply RTF (median)", _num(ratio["rtf_on"]), _num(ratio["rtf_off"]), ""]], "lrrr")]


def _soak_section(soak: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Soak", ""]
    if not soak:
        return lines + ["Not run (--soak-seconds 0)."]
    memory = soak.get("memory_mb")
    rows = [["turns completed", soak["turns_completed"]], ["sessions opened", soak["sessions_opened"]],
            ["errors", soak["errors"]], ["dropped sessions", soak["dropped"]],
            ["latency p50 / p95 (ms)", f"{_ms(soak['latency_ms']['p50'])} / {_ms(soak['latency_ms']['p95'])}"],
            ["latency p95, first half / second half (ms)",
             f"{_ms(soak['latency_p95_first_half_ms'])} / {_ms(soak['latency_p95_second_half_ms'])}"]]
    if memory:
        growth_pct = memory.get("growth_pct")
        rows += [["server RSS start / end / max", f"{_mb(memory['start'])} / {_mb(memory['end'])} / "
                                                  f"{_mb(memory['max'])}"],
                 ["RSS growth", f"{memory['growth']:+.1f} MiB"
                                + (f" ({growth_pct:+.1f} %)" if growth_pct is not None else "")]]
    else:
        rows.append(["server RSS", "not sampled (no server pid)"])
    lines += [f"{soak['clients']} sessions talking for {soak['seconds']:.0f} s (sessions of "
              f"{soak['settings'].get('turns_per_session')} turns, reconnecting), on a freshly started server:", "",
              *md_table(["figure", "value"], rows, "lr")]
    problems = {**soak.get("error_codes", {}), **soak.get("drop_reasons", {})}
    if problems:
        lines += ["", "Errors and dropped sessions by cause: " + "; ".join(f"{k} x{v}" for k, v in problems.items())]
    samples = [[s["t_s"], _mb(s.get("rss_mb")), s["turns"], s["errors"], s["dropped"],
                s.get("server_sessions") if s.get("server_sessions") is not None else "-"]
               for s in soak.get("samples", [])]
    return lines + ["", "Samples:", "",
                    *md_table(["t (s)", "server RSS", "turns", "errors", "dropped", "server sessions"], samples,
                              "rrrrrr")]


def write_benchmarks(path: Path, results: list[dict[str, Any]], meta: dict[str, Any],
                     soak: dict[str, Any] | None = None, root: Path | None = None,
                     capacity: dict[str, Any] | None = None, engine_profile: str | None = None) -> Path:
    """docs/benchmarks.md from the runs (`LoadResult.summary()` plus batching, server_rss_mb,
    server_stats), written atomically. meta: command, machine (machine_info()), model (the server's
    /stats model), serving (settings), started (ISO time), notes (list of lines). Paths under
    `root` (the project) are written relative to it: the file is committed, the machine's own
    folders are not its business."""
    lines = ["# Serving benchmarks", "",
             f"Written by `{meta.get('command', 's2s loadtest')}` on {meta.get('started') or _now()}. "
             "Do not edit this file by hand: run the command again.", "",
             *_machine_section(meta.get("machine") or machine_info()),
             *_model_section(meta.get("model") or {}, meta.get("serving")),
             *_load_section(results, meta.get("utterances")),
             *_goals_section(results, capacity), *_capacity_section(capacity), *_batching_section(batching_ratio(results)),
             *_levers_section(levers_ratio(results)), *_tick_section(results),
             *([engine_profile] if engine_profile else []), *_soak_section(soak)]
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    text = "\n".join(lines) + "\n"
    if root is not None:
        text = text.replace(f"{Path(root).resolve()}/", "").replace(f"{Path(root)}/", "")
    return atomic.write_text(Path(path), text)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def print_results(console: Any, results: list[dict[str, Any]], soak: dict[str, Any] | None = None) -> None:
    """The runs (and the soak) as rich tables."""
    from rich.table import Table

    latency = Table(title="first-audio latency (ms, client side)")
    for column in ("sessions", "batching", "turns", "errors", "dropped", "mean", "p50", "p95", "p99", "std"):
        latency.add_column(column, justify="right")
    more = Table(title="replies and the server")
    for column in ("sessions", "batching", "min ms", "max ms", "reply RTF", "server p95 ms", "client lag p99 ms",
                   "server RSS MiB"):
        more.add_column(column, justify="right")
    for r in results:
        lat = r["latency_ms"]
        mode = {True: "on", False: "off"}.get(r.get("batching"), "?")
        latency.add_row(str(r["clients"]), mode, f"{r['turns_completed']}/{r['turns_planned']}",
                        str(r["errors"]) if not r["errors"] else f"[red]{r['errors']}[/]",
                        str(r["dropped"]) if not r["dropped"] else f"[red]{r['dropped']}[/]",
                        *(_ms(lat[k]) for k in ("mean", "p50", "p95", "p99", "std")))
        more.add_row(str(r["clients"]), mode, _ms(lat["min"]), _ms(lat["max"]), _num(r.get("reply_rtf_median")),
                     _ms(r.get("server_latency_ms", {}).get("p95")), _ms((r.get("send_lag_ms") or {}).get("p99")),
                     _num(r.get("server_rss_mb"), 1))
    if results:
        console.print(latency)
        console.print(more)
        goals = Table(title="Goals")
        for column in ("goal", "measured", "status"):
            goals.add_column(column)
        colour = {"met": "green", "missed": "red"}
        for g in evaluate_goals(results):
            goals.add_row(g["goal"], g["measured"], f"[{colour.get(g['status'], 'yellow')}]{g['status']}[/]")
        console.print(goals)
        ratio = batching_ratio(results)
        if ratio:
            console.print(f"batching off / on at {ratio['sessions']} sessions: p95 x{_num(ratio['p95_ratio'])}, "
                          f"mean x{_num(ratio['mean_ratio'])}")
    if soak:
        memory = soak.get("memory_mb") or {}
        console.print(f"soak: {soak['clients']} sessions, {soak['seconds']:.0f} s, {soak['turns_completed']} turns, "
                      f"{soak['errors']} errors, {soak['dropped']} dropped; RSS {_mb(memory.get('start'))} -> "
                      f"{_mb(memory.get('end'))} (max {_mb(memory.get('max'))})", soft_wrap=True)
