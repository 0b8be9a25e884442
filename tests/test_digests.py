"""The corpus's per-file digest list and the pinned numerics the corpus is computed with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.data import digests, pinned_numerics


def test_a_changed_byte_names_its_file(tmp_path: Path):
    data = tmp_path / "data"
    (data / "segments").mkdir(parents=True)
    (data / "manifest.csv").write_text("a,b\n1,2.5\n")
    (data / "segments" / "x.wav").write_bytes(b"RIFF" + bytes(100))
    listing = digests.write(tmp_path / "data.digests", digests.tree_digests(data))
    assert digests.compare(digests.read(listing), digests.tree_digests(data)) == []
    assert "# tool ffmpeg:" in listing.read_text()

    (data / "manifest.csv").write_text("a,b\n1,2.51\n")  # one byte more, as on the other machine
    (data / "segments" / "x.wav").unlink()
    (data / "extra.json").write_text("{}")
    assert [line.split(" (")[0] for line in digests.compare(digests.read(listing), digests.tree_digests(data))] == [
        "unexpected: extra.json", "differs: manifest.csv", "missing: segments/x.wav"]
    assert "(10 -> 11 bytes" in digests.compare(digests.read(listing), digests.tree_digests(data))[1]


def test_a_malformed_listing_is_refused_by_line(tmp_path: Path):
    with pytest.raises(ValueError, match="line 2: expected 'sha256 size path'"):
        digests.parse("# header\nnot a digest line\n")


def _child_numerics() -> tuple[str, int, str]:
    import torch

    return torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), os.environ.get("MKL_CBWR", "")


def test_the_corpus_numerics_run_capped_at_avx2_and_one_thread():
    if not pinned_numerics.has_avx2():
        pytest.skip("no AVX2 here: the steps run unpinned (documented)")
    capability, threads, mkl = pinned_numerics.run_pinned(_child_numerics)
    assert capability == "AVX2" and threads == 1 and mkl == "AVX2"
    assert "S2S_PINNED_NUMERICS" not in os.environ, "the parent's environment is left as it was"


def test_an_interrupted_caller_stops_the_pinned_child(tmp_path: Path):
    """SIGTERM of a flow mid-step (a worker stopping it) ends the pinned child's work at once,
    instead of waiting for the step (minutes of segmentation) to finish."""
    import signal
    import subprocess
    import sys
    import time

    if not pinned_numerics.has_avx2():
        pytest.skip("no AVX2 here: the steps run in place")
    script = (  # SIGTERM raises in the caller, as Prefect's flow engine makes it do
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
        "from tasks.data.pinned_numerics import run_pinned\n"
        "print('started', flush=True)\n"
        "run_pinned(time.sleep, 600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "started"
    time.sleep(20)  # the child is up and sleeping
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    time.sleep(1)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert not alive, f"pinned children still running after the caller stopped: {alive}"


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text().lower()
    except OSError:
        return False


@pytest.mark.parametrize("spawned_from", ["main thread", "worker thread"])
def test_the_pinned_child_ends_when_its_parent_is_killed_with_sigkill(spawned_from: str):
    """kill -9 of a flow leaves no pinned child behind, idle or busy, whichever thread of the
    flow's process started it (a task thread that ended since, too)."""
    import signal
    import subprocess
    import sys
    import time

    if not pinned_numerics.has_avx2():
        pytest.skip("no AVX2 here: the steps run in place, there is no child")
    script = (
        "import os, sys, threading, time\n"
        "from tasks.data.pinned_numerics import run_pinned\n"
        "pids = []\n"
        "start = lambda: pids.append(run_pinned(os.getpid))\n"
        f"if {spawned_from == 'worker thread'}:\n"
        "    thread = threading.Thread(target=start); thread.start(); thread.join()  # that thread is gone\n"
        "else:\n"
        "    start()\n"
        "print(pids[0], flush=True)\n"
        "time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    child = int(process.stdout.readline())
    assert child != process.pid and _alive(child), "the pinned child runs beside its parent"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 60  # a hang guard; the child watches every 0.5 s
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, f"the pinned child {child} outlived its parent killed with -9"
