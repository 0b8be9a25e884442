"""Run the corpus's numeric steps on one instruction set, so every machine computes the same bytes.

numpy, OpenBLAS, torch (ATen, MKL, oneDNN) and ffmpeg pick their float kernels by the CPU they
find, and split reductions over as many threads as it has cores: on an AVX-512 machine they run other code (other vector widths, other summation orders,
other approximations of log10, exp, sin) than on an AVX2 one, and float results differ in their
last bits. The corpus is made of such results (the mixed episodes, the resampled audio, Silero's
speech probabilities, the segment metrics), so one machine's corpus differed from another's by a
byte. Each library has a documented switch that caps the instruction set; they must be set before
the library loads, so the steps run in a fresh child process with them (`run_pinned`).

The cap is AVX2 (x86-64-v3: Intel since 2013, AMD since 2015); a machine without AVX2 runs its
own kernels and is not promised the committed digests.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")
MARKER = "S2S_PINNED_NUMERICS"
# numpy's names for its dispatch targets above AVX2 (numpy >= 2.4, then older releases)
NUMPY_ABOVE_AVX2 = ("X86_V4", "AVX512_ICL", "AVX512_SPR", "AVX512F", "AVX512CD", "AVX512_KNL", "AVX512_KNM",
                    "AVX512_SKX", "AVX512_CLX", "AVX512_CNL", "AVX512FP16")
# ffmpeg's flags above AVX2, removed from what it detects (`-cpuflags -flag...`)
FFMPEG_CPUFLAGS = "-avx512-avx512icl"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_avx2() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and "avx2" in _cpu_flags()


def pinned_env() -> dict[str, str]:
    """The variables that cap every library's kernels at AVX2 and at one thread (none off x86 or
    without AVX2)."""
    if not has_avx2():
        return {}
    import numpy as np

    found = getattr(np._core._multiarray_umath, "__cpu_features__", {}) if hasattr(np, "_core") else {}
    disable = [name for name in NUMPY_ABOVE_AVX2 if found.get(name)]
    env = {
        "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorized kernels
        "MKL_CBWR": "AVX2",  # MKL (torch's BLAS): conditional numerical reproducibility, AVX2 branch
        "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",  # oneDNN (torch's convolutions)
        "OPENBLAS_CORETYPE": "Haswell",  # numpy's and scipy's OpenBLAS
        MARKER: "1",
    }
    # one thread: a parallel reduction's partial sums (torch, MKL, OpenBLAS) depend on the thread count
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    if disable:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(disable)
    return env


def ffmpeg_args() -> list[str]:
    """Global ffmpeg arguments with the same cap (empty where no cap applies)."""
    return ["-cpuflags", FFMPEG_CPUFLAGS] if has_avx2() else []


def is_pinned() -> bool:
    return os.environ.get(MARKER) == "1" or not has_avx2()


@contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_pool: ProcessPoolExecutor | None = None
_pool_guard = threading.Lock()
PARENT_CHECK_S = 0.5


def _watch_parent(parent: int, from_main_thread: bool) -> None:
    """In the child: end it when the process that started it is gone, however that died.

    A ProcessPoolExecutor child only notices its parent's death when the parent shuts it down or
    its result pipe breaks, so after a `kill -9` of the flow an idle (or busy) child lived on,
    holding its memory. Linux's PR_SET_PDEATHSIG is the immediate signal, but it fires when the
    parent *thread* that spawned the child exits (a Prefect task thread may be that one), so it is
    only armed when the parent's main thread spawned it (`from_main_thread`); a daemon thread that
    sees getppid() change (the child reparented) covers every case within PARENT_CHECK_S."""
    if sys.platform == "linux" and from_main_thread:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def _worker() -> ProcessPoolExecutor:
    """One pinned child per process, started on first use and kept: its libraries load once."""
    global _pool
    with _pool_guard:
        if _pool is None:
            with _environment(pinned_env()):
                context = multiprocessing.get_context("spawn")  # a fresh interpreter reads the variables
                on_main = threading.current_thread() is threading.main_thread()
                _pool = ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_watch_parent,
                                            initargs=(os.getpid(), on_main))
                _pool.submit(int).result()  # start it now, while the variables are set
        return _pool


def shutdown_worker() -> None:
    """Stop the pinned child (it is also stopped at exit); the next call starts a new one."""
    global _pool
    with _pool_guard:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None


def _call(environ: dict[str, str], fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    """In the child: the caller's environment of this call (S2S_ROOT...), the caps kept."""
    pins = pinned_env()
    os.environ.clear()
    os.environ.update({**environ, **pins})
    return fn(*args, **kwargs)


def run_pinned(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in a child process whose libraries loaded capped at AVX2 and one
    thread (in this process when it already is). `fn` and its arguments must be picklable; its
    exceptions come back as they were raised."""
    global _pool
    if is_pinned():
        return fn(*args, **kwargs)
    pool = _worker()
    try:
        return pool.submit(_call, dict(os.environ), fn, args, kwargs).result()
    except BrokenProcessPool:  # the child died (killed, out of memory): the next call starts another
        with _pool_guard:
            _pool = None
        raise
    except BaseException:  # interrupted (SIGTERM, Ctrl-C): stop the child's work too, not wait for it
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        with _pool_guard:
            _pool = None
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def pinned(when: Callable[..., bool] | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a module-level function so every caller (flow, CLI, dvc repro, tests) runs it
    through `run_pinned`; `when(*args, **kwargs)` False runs it in place (e.g. a diarizer object
    that cannot cross to another process)."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            if is_pinned() or (when is not None and not when(*args, **kwargs)):
                return fn(*args, **kwargs)
            return run_pinned(wrapper, *args, **kwargs)  # the child finds itself pinned: runs fn

        return wrapper

    return decorate
