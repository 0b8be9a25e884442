"""The fault-injection suite: real processes killed (SIGKILL) or starved (a full filesystem, a held
workspace, corrupt inputs), then the stores checked: nothing lost, nothing half-written read, the
rerun recovers. Fast cases run in `make test`; the long ones are marked `chaos` and run by
`s2s chaos`, which also writes the table in docs/reliability.md (tests/chaos_report.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from .conftest import REPO, TINY, cli_sets, require_tool, speak

RNG = random.Random(int(os.environ.get("S2S_CHAOS_SEED", "17")))


def _python(script: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# --- corrupt inputs -------------------------------------------------------------------------------------------

def _wav_header(data_bytes: int, rate: int = 16000) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data_bytes))


def corrupt_inputs(folder: Path) -> dict[str, str]:
    """Generated bad media, by name, with the refusal code each must get; plus one good file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(17)
    (folder / "random.mp3").write_bytes(rng.bytes(64_000))
    (folder / "empty.wav").write_bytes(b"")
    (folder / "wrong_header.wav").write_bytes(_wav_header(64_000)[:20] + rng.bytes(64_000))  # RIFF, broken fmt
    (folder / "header_only.flac").write_bytes(b"fLaC" + rng.bytes(200))
    huge = _wav_header(16000 * 2 * 36000)  # declares 10 hours, holds 1 second
    (folder / "huge_declared.wav").write_bytes(huge + (rng.standard_normal(16000) * 1000).astype("<i2").tobytes())
    silence = folder / "silence_10h.wav"  # a whole, valid WAV of 10 hours of silence (sparse on disk)
    with open(silence, "wb") as handle:
        handle.write(_wav_header(16000 * 2 * 36000))
        handle.truncate(44 + 16000 * 2 * 36000)
    sf.write(folder / "good.wav", speak("ఈ రోజు వాతావరణం చాలా బాగుంది కదా?"), 16000, subtype="PCM_16")
    return {"random.mp3": "unreadable", "empty.wav": "unreadable", "wrong_header.wav": "unreadable",
            "header_only.flac": "unreadable", "huge_declared.wav": "truncated", "silence_10h.wav": "too_long"}


NORMALIZE_ALL = """
import json, resource, sys
from pathlib import Path
from core.config import load_params
from tasks.data.download import Recording
from tasks.data.normalize import normalize_all
folder, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_params("smoke").normalize
recordings = [Recording("bad", p.stem, p) for p in sorted(folder.iterdir())]
done, failures = normalize_all(recordings, cfg, out)
from tasks.data.pinned_numerics import shutdown_worker
shutdown_worker()  # reap the pinned child, so its peak memory is counted below
peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"done": [r.recording_id for r in done], "failures": failures, "peak_mib": peak_kib / 1024}))
"""


def test_corrupt_inputs_are_refused_with_reasons_in_bounded_memory(tmp_path: Path, project_root: Path, chaos):
    expected = corrupt_inputs(tmp_path / "media")
    started = time.monotonic()
    result = _python(NORMALIZE_ALL, str(tmp_path / "media"), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["done"] == ["good"], "the good file goes through beside the bad ones"
    codes = {rid: f["code"] for rid, f in report["failures"].items()}
    assert codes == {Path(name).stem: code for name, code in expected.items()}
    for rid, failure in report["failures"].items():
        assert failure["error"].startswith(rid) and len(failure["error"]) > len(rid) + 10, failure
    assert "10.0 h of audio" in report["failures"]["silence_10h"]["error"]
    assert report["peak_mib"] < 1500, f"memory bounded: peak {report['peak_mib']:.0f} MiB (10 h decoded is 2.3 GB)"
    row = chaos.row("corrupt media (random bytes, empty, broken headers, 10 h declared, 10 h of silence)",
                    "each refused with its code and reason, the good file normalized, peak memory < 1.5 GB")
    row.injected += len(expected)
    row.recovered += len(codes)
    row.recover_seconds.append(time.monotonic() - started)


@pytest.mark.parametrize("failing", [pytest.param(20, id="20"), pytest.param(1000, id="1000", marks=[pytest.mark.chaos, pytest.mark.timeout(3600)])])
def test_failing_sources_are_each_reported_and_the_run_goes_on(tmp_path: Path, chaos, failing: int):
    """Every entry of a long source list failing (1,000 under `s2s chaos`; yt-dlp takes ~0.4 s an
    entry on a busy 2-core machine, so `make test` runs 20)."""
    from core.config import load_params
    from tasks.data.download import download_sources
    from tasks.data.sources import Source

    good = tmp_path / "good.wav"
    sf.write(good, speak("నేను అన్నం, పప్పు తిన్నాను."), 16000, subtype="PCM_16")
    sources = [Source(id=f"gone{i:04d}", url=(tmp_path / f"gone{i:04d}.wav").as_uri(), licence="test")
               for i in range(failing)] + [Source(id="good", url=good.as_uri(), licence="test")]
    cfg = load_params("smoke").download
    started = time.monotonic()
    report = download_sources(sources, cfg, tmp_path / "downloads", tmp_path / "downloads" / "archive.txt")
    assert [r.source_id for r in report.recordings] == ["good"]
    assert len(report.failures) == failing and len({f.source_id for f in report.failures}) == failing
    assert all(f.error for f in report.failures)
    row = chaos.row(f"source list with {failing:,} failing entries", "one error per entry, the good source downloaded")
    row.injected += failing
    row.recovered += len(report.failures)
    row.recover_seconds.append(time.monotonic() - started)


# --- disk full ------------------------------------------------------------------------------------------------

DISK_FULL = """
import json, os, sys, torch
from pathlib import Path
from core import atomic
from core.checkpoints import load_checkpoint, save_checkpoint
mnt = Path(sys.argv[1])
out = {}

def fill(leave: int) -> None:
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(mnt / f"filler{len(list(mnt.glob('filler*')))}", "wb") as h:
        h.write(b"\\0" * max(0, free - leave))

def attempt(name, write, check):
    try:
        write()
        out[name] = {"error": None}
    except atomic.DiskFullError as exc:
        out[name] = {"error": str(exc)}
    except Exception as exc:
        out[name] = {"error": f"UNEXPECTED {type(exc).__name__}: {exc}"}
    out[name]["previous_intact"] = check()
    out[name]["leftovers"] = sorted(p.name for p in p_parent(name).iterdir() if p.name.startswith("."))

parents = {"checkpoint": mnt / "ckpt", "corpus": mnt, "bundle": mnt / "bundles"}
p_parent = parents.__getitem__

# the good artifacts first
small = {"w": torch.arange(1000, dtype=torch.float32)}
save_checkpoint(mnt / "ckpt" / "last.pt", model=small, step=1)
with atomic.atomic_dir(mnt / "data") as d:
    (d / "manifest.csv").write_text("segment_id\\nold\\n")
from tests.conftest import _tiny_mel_codec, _export_tiny_bundle
from models.s2s_transformer import S2SConfig
from serving.bundle import export_bundle
disk = Path(sys.argv[2])  # the checkpoints a bundle is made from live on the real disk
codec = _tiny_mel_codec()
for name, size in (("small", dict(d_model=16, n_layers=1)), ("big", dict(d_model=256, n_layers=4))):
    (disk / name).mkdir()
    _export_tiny_bundle(disk / name, codec, S2SConfig(n_codebooks=2, codebook_size=16, n_heads=2, max_len=64, **size))
bundle = export_bundle(disk / "small" / "codec.pt", disk / "small" / "s2s.pt", mnt / "bundles" / "bundle",
                       {"model_name": "tiny"})
meta_before = (bundle / "bundle.json").read_text()
fill(64 * 1024)

big = {"w": torch.zeros(2_000_000)}
attempt("checkpoint", lambda: save_checkpoint(mnt / "ckpt" / "last.pt", model=big, step=2),
        lambda: torch.equal(load_checkpoint(mnt / "ckpt" / "last.pt")["model"]["w"], small["w"]))

def corpus():
    with atomic.atomic_dir(mnt / "data") as d:
        (d / "manifest.csv").write_text("segment_id\\nnew\\n")
        (d / "clip.wav").write_bytes(b"\\0" * 4_000_000)
attempt("corpus", corpus, lambda: (mnt / "data" / "manifest.csv").read_text() == "segment_id\\nold\\n")

def new_bundle():
    export_bundle(disk / "big" / "codec.pt", disk / "big" / "s2s.pt", mnt / "bundles" / "bundle", {"model_name": "tiny"})
def bundle_intact():
    from serving.bundle import load_bundle_dir
    load_bundle_dir(bundle)  # verifies the sha256s in bundle.json
    return (bundle / "bundle.json").read_text() == meta_before
attempt("bundle", new_bundle, bundle_intact)
print(json.dumps(out))
"""


def _in_small_tmpfs(tmp_path: Path, script: str, size: str = "8m") -> subprocess.CompletedProcess:
    """Run `script` with a tmpfs of `size` mounted at argv[1], in a private mount namespace
    (unshare: as root, or as a user where user namespaces are allowed), so nothing is left mounted."""
    import shutil

    require_tool("unshare", shutil.which("unshare") is not None, "the disk-full case mounts a small tmpfs")
    mnt, disk = tmp_path / "small_fs", tmp_path / "disk"
    mnt.mkdir()
    disk.mkdir()
    script_file = tmp_path / "inside.py"
    script_file.write_text(textwrap.dedent(script))
    flags = ["-m"] if os.geteuid() == 0 else ["-rm"]
    command = (f"mount -t tmpfs -o size={size} tmpfs {mnt} && cd {REPO} && "
               f"exec {sys.executable} {script_file} {mnt} {disk}")
    return subprocess.run(["unshare", *flags, "sh", "-c", command], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def test_disk_full_while_writing_a_checkpoint_a_corpus_and_a_bundle(tmp_path: Path, chaos):
    started = time.monotonic()
    result = _in_small_tmpfs(tmp_path, DISK_FULL)
    if result.returncode != 0 and "mount" in result.stderr and "permission" in result.stderr.lower():
        require_tool("a mountable tmpfs", False, f"unshare/mount refused: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    row = chaos.row("disk full while writing a checkpoint, the corpus, a bundle (8 MB tmpfs)",
                    "DiskFullError names the path and the MiB free; the previous artifact loads and is unchanged; "
                    "no temporary left")
    for name, what in outcome.items():
        row.injected += 1
        assert what["error"] and "no space left on device while writing" in what["error"], (name, what)
        assert "MiB free of" in what["error"] and str(tmp_path) in what["error"], (name, what)
        assert what["previous_intact"], f"{name}: the previous artifact was damaged"
        assert not what["leftovers"], f"{name}: temporaries left: {what['leftovers']}"
        row.recovered += 1
    row.recover_seconds.append(time.monotonic() - started)


# --- two runs in one workspace --------------------------------------------------------------------------------

HOLD = """
import sys, time
from core.workspace_lock import workspace_lock
with workspace_lock(sys.argv[1], "pipeline flow"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(root: Path, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(root), str(seconds)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.strip() == "held", process.stderr.read()
    return process


def test_a_second_run_in_one_workspace_is_refused_and_a_killed_holder_frees_it(project_root: Path, chaos):
    from core.workspace_lock import WorkspaceBusy, workspace_lock
    from flows.pipeline_flow import pipeline_flow

    holder = _holder(project_root, 300)
    try:
        with pytest.raises(WorkspaceBusy, match=rf"in use by pid {holder.pid} \(pipeline flow"):
            pipeline_flow.fn(profile="smoke")  # the flow body, as a worker or the CLI would run it
        for flow_name in ("flows.data_flow:data_flow", "flows.train_flow:train_flow"):
            module, name = flow_name.split(":")
            with pytest.raises(WorkspaceBusy):
                getattr(__import__(module, fromlist=[name]), name).fn(profile="smoke")
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        started = time.monotonic()
        with workspace_lock(project_root, "test"):
            with workspace_lock(project_root, "subflow"):  # reentrant: the pipeline runs its subflows
                pass
        recovered = time.monotonic() - started
    finally:
        holder.kill()
    row = chaos.row("two flow runs at once in one workspace; then the holder killed -9",
                    "the second is refused naming the holder's pid; the kernel frees the lock of a killed run")
    row.injected += 1
    row.recovered += 1
    row.recover_seconds.append(recovered)


def test_of_two_runs_started_together_exactly_one_gets_the_workspace(project_root: Path):
    race = """
    import sys, time
    from core.workspace_lock import WorkspaceBusy, workspace_lock
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    try:
        with workspace_lock(sys.argv[1], "pipeline flow"):
            print("ran", flush=True)
            time.sleep(5)
    except WorkspaceBusy as exc:
        print("refused:", exc, flush=True)
    """
    at = str(time.time() + 4)
    runs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(race), str(project_root), at], cwd=REPO,
                             stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = sorted(run.communicate(timeout=120)[0].strip() for run in runs)
    assert outputs[0] == "ran" and outputs[1].startswith("refused: the workspace"), outputs


# --- training killed at random steps --------------------------------------------------------------------------

def _last_step(metrics: Path) -> int:
    try:
        steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return 0
    return max(steps, default=0)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "s2s.cli", *args]


@pytest.mark.chaos
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("stage", ["codec", "s2s"])
def test_training_killed_at_random_steps_resumes_to_identical_weights(tiny_corpus: Path, project_root: Path, chaos,
                                                                      stage: str):
    """SIGKILL at random steps (S2S_CHAOS_KILLS times, 3 by default), each followed by `--resume`:
    the last checkpoint always loads, and the weights at the end equal an uninterrupted run's, bit
    for bit."""
    import torch

    kills = int(os.environ.get("S2S_CHAOS_KILLS", "3"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    total = 40 if stage == "codec" else 24
    sets = [*cli_sets(TINY), f"--set={stage}_train.max_steps={total}"]
    if stage == "s2s":  # the codec it tokenizes with
        subprocess.run(_cli("train", "codec", "--no-mlflow", *cli_sets(TINY), "--set=codec_train.max_steps=4"),
                       check=True, env=env, capture_output=True, cwd=project_root)
    base = ["train", stage, "--no-mlflow", *sets]
    reference, killed = project_root / f"{stage}-reference", project_root / f"{stage}-killed"
    subprocess.run(_cli(*base, f"--set={stage}_train.out_dir={reference}"), check=True, env=env, capture_output=True,
                   cwd=project_root)

    row = chaos.row(f"kill -9 of {stage} training at random steps, then --resume",
                    "the last checkpoint loads after every kill; final weights equal the uninterrupted run's bit for bit")
    metrics = killed / "metrics.jsonl"
    resume: list[str] = []
    checkpoint_step = 0
    for _ in range(kills):
        before = _last_step(metrics)
        target = RNG.randint(before + 1, total - 1) if before + 1 <= total - 1 else total - 1
        started = time.monotonic()
        process = subprocess.Popen(_cli(*base, f"--set={stage}_train.out_dir={killed}", *resume), env=env,
                                   cwd=project_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        recovered_at = None
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline and _last_step(metrics) < target:
            if recovered_at is None and resume and _last_step(metrics) > checkpoint_step:
                recovered_at = time.monotonic() - started
            time.sleep(0.005)
        if recovered_at is not None:
            row.recover_seconds.append(recovered_at)
        process.send_signal(signal.SIGKILL)
        process.wait()
        row.injected += 1
        try:
            checkpoint_step = torch.load(killed / "last.pt", weights_only=False)["step"]
        except FileNotFoundError:
            checkpoint_step = 0  # killed before the first checkpoint: the rerun starts over, nothing lost
        except Exception:  # a half-written checkpoint read back
            row.corrupt_read += 1
            raise
        resume = ["--resume"]
    started = time.monotonic()
    subprocess.run(_cli(*base, f"--set={stage}_train.out_dir={killed}", "--resume"), check=True, env=env,
                   capture_output=True, cwd=project_root)
    want = torch.load(reference / "last.pt", weights_only=False)
    got = torch.load(killed / "last.pt", weights_only=False)
    assert got["step"] == want["step"] == total
    differing = [name for name, value in want["model"].items() if not torch.equal(value, got["model"][name])]
    assert not differing, f"weights differ from the uninterrupted run in {differing[:5]}"
    row.recovered += kills


# --- the server killed mid-reply ------------------------------------------------------------------------------

def _talk(url: str, pcm: bytes, on_first_audio=None) -> str:
    """One turn over the WebSocket protocol: 'reply' when reply_end came, 'closed' when the
    connection closed under the client; a hang raises TimeoutError."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(url, open_timeout=60, max_size=None) as ws:
        ws.send(json.dumps({"type": "start", "protocol": 1, "speaker": "male_young", "emotion": "neutral",
                            "sample_rate": 16000, "vad": "client"}))
        assert json.loads(ws.recv(timeout=60))["type"] == "ready"
        for i in range(0, len(pcm), 640):
            ws.send(pcm[i:i + 640])
        ws.send(json.dumps({"type": "end_of_utterance"}))
        try:
            while True:
                message = ws.recv(timeout=60)
                if isinstance(message, bytes) and on_first_audio is not None:
                    on_first_audio()
                    on_first_audio = None
                elif isinstance(message, str) and json.loads(message)["type"] == "reply_end":
                    return "reply"
        except ConnectionClosed:
            return "closed"


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_server_killed_mid_reply_closes_the_client_and_a_restart_serves(bundle_dir: Path, chaos):
    from tasks.benchmarks.server_launcher import ServerProcess

    audio = speak("నువ్వు ఈ రోజు ఏమి తిన్నావు?")
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    row = chaos.row("server killed (-9) mid-reply, then restarted",
                    "the client sees a close, not a hang; the restarted server serves a whole reply")
    for _ in range(int(os.environ.get("S2S_CHAOS_KILLS", "3"))):
        server = ServerProcess(str(bundle_dir), startup_timeout_s=300)
        with server:
            killed_at: list[float] = []

            def kill() -> None:
                server.process.send_signal(signal.SIGKILL)
                killed_at.append(time.monotonic())

            outcome = _talk(server.url, pcm, on_first_audio=kill)
            assert outcome == "closed" and killed_at, outcome
            row.injected += 1
        started = time.monotonic()
        with ServerProcess(str(bundle_dir), port=server.port, startup_timeout_s=300) as again:
            assert _talk(again.url, pcm) == "reply"
        row.recover_seconds.append(time.monotonic() - started)
        row.recovered += 1


# --- the MLflow store unreachable -----------------------------------------------------------------------------

@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_an_unreachable_mlflow_store_fails_the_run_clearly_and_the_next_run_works(tiny_corpus: Path,
                                                                                    project_root: Path, chaos):
    from tasks.benchmarks.server_launcher import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    base = ["train", "codec", *cli_sets(TINY), "--set=codec_train.max_steps=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": dead, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    failed = subprocess.run(_cli(*base), env=env, capture_output=True, text=True, cwd=project_root, timeout=600)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert f"the MLflow store {dead} cannot be used" in failed.stdout, failed.stdout[-2000:]
    assert "Traceback" not in failed.stdout + failed.stderr
    started = time.monotonic()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project_root / 'mlflow' / 'mlflow.db'}"
    subprocess.run(_cli(*base), env=env, check=True, capture_output=True, cwd=project_root, timeout=600)
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"], "one run, finished; none left half-logged"
    row = chaos.row("MLflow store unreachable when training starts",
                    "one-line error naming the store after MLflow's configured retries; the next run logs and finishes")
    row.injected += 1
    row.recovered += 1
    row.recover_seconds.append(time.monotonic() - started)
