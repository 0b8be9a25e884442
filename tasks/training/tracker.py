"""MLflow tracking for the training tasks: the experiment, a run on the main rank only (plus a
local metrics.jsonl that resume truncates) and ending it as FAILED or KILLED when training raises."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

from core import atomic
from core.tracking import tracking_uri


T = TypeVar("T")
LOCK_WAIT_S = 60.0  # params.yaml mlflow.lock_wait_s
UNFINISHED = "mlflow-unfinished.json"  # beside metrics.jsonl: a run the store was locked to end


class TrackingStoreError(RuntimeError):
    """The MLflow store cannot be reached or is locked; the message names it and what to do."""


class _LockedNoise(logging.Filter):
    """MLflow logs each failed SQLite call with its whole traceback (ERROR, mlflow.store.db.utils);
    call_store retries "database is locked" and reports it in one line, so those records go."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "database is locked" not in record.getMessage()


_DB_LOGGER = logging.getLogger("mlflow.store.db.utils")


def call_store(store: str, wait_s: float, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(...)` against the store, retried while SQLite reports it locked (another process in a
    write transaction: a migration, `mlflow gc`, a stuck writer) for `wait_s` seconds, then
    TrackingStoreError naming the store. Any other failure is raised as it is."""
    if not any(isinstance(f, _LockedNoise) for f in _DB_LOGGER.filters):
        _DB_LOGGER.addFilter(_LockedNoise())
    deadline, delay = time.monotonic() + wait_s, 0.25
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if "database is locked" not in str(exc).lower():
                raise
            if time.monotonic() >= deadline:
                raise TrackingStoreError(
                    f"the MLflow store {store} cannot be used: it is locked by another process (waited {wait_s:g} s, "
                    "mlflow.lock_wait_s). Wait for the process that locks it, point MLFLOW_TRACKING_URI elsewhere, "
                    "or train with --no-mlflow") from exc
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


def use_experiment(root: Path, uri: str | None, experiment: str, lock_wait_s: float = LOCK_WAIT_S) -> str:
    """Point MLflow at the store and the experiment, creating it where missing.

    The embedded store (SQLite under mlflow/) keeps artifacts beside it in mlflow/artifacts. Any
    other store (a tracking server a team shares) chooses the artifact location itself: with
    `mlflow server --serve-artifacts` that is `mlflow-artifacts:/...`, proxied to its bucket, so
    every machine can fetch the model. A local file:// location there would put the model on the
    first client's disk, out of the other machines' reach, so such an experiment is refused.

    A store that does not answer (a server down, a SQLite file locked by another writer) fails
    here, before any training, with one line naming it: MLflow's own retries
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT) have run by then."""
    import mlflow

    store = tracking_uri(root, uri)
    mlflow.set_tracking_uri(store)
    try:
        found = call_store(store, lock_wait_s, mlflow.get_experiment_by_name, experiment)
    except TrackingStoreError:
        raise
    except Exception as exc:  # MlflowException, requests' ConnectionError, sqlalchemy's OperationalError
        cause = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise TrackingStoreError(f"the MLflow store {store} cannot be used: {cause}. Start it (or wait for the "
                                 "process that locks it), point MLFLOW_TRACKING_URI at one that runs, or train "
                                 "with --no-mlflow") from exc
    local = is_local_store(store)
    if found is None:
        location = None
        if local:
            artifacts = root / "mlflow" / "artifacts"
            artifacts.mkdir(parents=True, exist_ok=True)
            location = artifacts.as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
        found = mlflow.get_experiment_by_name(experiment)
    if not local and is_local_store(found.artifact_location):
        raise TrackingError(
            f"experiment {experiment!r} on {store} keeps its artifacts at {found.artifact_location}, a folder on one "
            "machine that other clients cannot read: track through `mlflow server --serve-artifacts` (an http(s) "
            "MLFLOW_TRACKING_URI), and if an older client created this experiment, use another experiment name "
            "(mlflow.experiment in params.yaml) so that the server picks its own artifact store")
    mlflow.set_experiment(experiment)
    return found.experiment_id


class TrackingError(RuntimeError):
    """The tracking store is set up in a way that would lose or strand what runs log."""


def is_local_store(store: str) -> bool:
    """A store on this machine's disk (SQLite file, file:// or a plain path), not a shared server."""
    scheme = urlparse(store).scheme.lower()
    return len(scheme) <= 1 or scheme in ("file", "sqlite")  # "" or a drive letter: a path


class RunTracker:
    """An MLflow run on the main rank (nothing on the others), plus a local metrics.jsonl.

    The JSONL beside the checkpoints is what resume tests and dashboards without MLflow read; it
    is appended per logged step and truncated to the resumed step on resume.
    """

    def __init__(self, main: bool, use_mlflow: bool, root: Path, uri: str | None, experiment: str, run_name: str,
                 metrics_path: Path, resume_step: int, system_metrics: bool, run_id: str | None = None,
                 parent_run_id: str | None = None, progress_path: Path | None = None,
                 lock_wait_s: float = LOCK_WAIT_S) -> None:
        self.main = main
        self.enabled = main and use_mlflow  # MLflow on the main rank only
        self.metrics_path = metrics_path
        self.progress = TrainingProgress(progress_path, run_name) if main and progress_path else None
        self.run_id: str | None = None
        if not main:
            return
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and metrics_path.is_file():
            kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= resume_step]
        atomic.write_text(metrics_path, "".join(l + "\n" for l in kept))
        if self.progress is not None:
            self.progress.write(resume_step, running=True)
        if not self.enabled:
            return
        import mlflow

        self.mlflow = mlflow
        self.store, self.lock_wait_s = tracking_uri(root, uri), lock_wait_s
        use_experiment(root, uri, experiment, lock_wait_s)
        self._end_unfinished()
        # a run continued by a new flow run (resumed after a kill) moves under that flow's run
        tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
        run = self._call(mlflow.start_run, run_id=run_id, run_name=None if run_id else run_name, tags=tags,
                         log_system_metrics=system_metrics, nested=mlflow.active_run() is not None)
        self.run_id = run.info.run_id

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return call_store(self.store, self.lock_wait_s, fn, *args, **kwargs)

    def _end_unfinished(self) -> None:
        """End the run an earlier process could not (the store was locked when it failed)."""
        pending = self.metrics_path.parent / UNFINISHED
        if not pending.is_file():
            return
        left = json.loads(pending.read_text())
        if left.get("store") == self.store:
            from mlflow import MlflowClient

            self._call(MlflowClient(tracking_uri=self.store).set_terminated, left["run_id"], left["status"])
        pending.unlink()

    @classmethod
    def for_training(cls, params: Any, stage: str, out_dir: Path, is_main: bool, use_mlflow: bool,
                     resume_step: int, run_id: str | None, parent_run_id: str | None = None) -> "RunTracker":
        """The tracker of a training stage: its run (continued on resume, nested under the flow's
        run when there is one) and its metrics.jsonl."""
        progress = params.path(params.paths.artifacts) / "metrics" / f"training-{stage}.prom"
        return cls(is_main, use_mlflow, params.root, params.mlflow.tracking_uri, params.mlflow.experiment, stage,
                   out_dir / "metrics.jsonl", resume_step, params.mlflow.system_metrics, run_id, parent_run_id,
                   progress, params.mlflow.lock_wait_s)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            self._call(self.mlflow.log_params, {k: str(v)[:500] for k, v in params.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._call(self.mlflow.set_tags, tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.main:
            return
        if self.enabled:
            self._call(self.mlflow.log_metrics, metrics, step=step)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.progress is not None:
            self.progress.write(step, running=True)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled:
            self._call(self.mlflow.log_artifact, str(path), artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        if self.progress is not None:
            self.progress.write(None, running=False)
        if not self.enabled:
            return
        from mlflow import MlflowClient

        try:  # mlflow.end_run forgets the run before it writes, so a retried one would end nothing
            self._call(MlflowClient(tracking_uri=self.store).set_terminated, self.run_id, status)
            self._call(self.mlflow.end_run, status=status)  # the active-run stack, the system-metrics thread
        except TrackingStoreError:
            # the store stayed locked: the next tracker on this folder ends the run (_end_unfinished)
            atomic.write_json(self.metrics_path.parent / UNFINISHED,
                              {"run_id": self.run_id, "status": status, "store": self.store})
            if status == "FINISHED":
                raise


class TrainingProgress:
    """The training's heartbeat for Prometheus, in the node exporter's textfile format: when it
    last logged, at which step, and whether it is running. A run that dies or hangs leaves
    `running` at 1 with an old timestamp, which the TrainingStoppedLogging alert catches
    (monitoring/alerts.yml); point the node exporter's --collector.textfile.directory at the folder."""

    def __init__(self, path: Path, stage: str) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.path, self.registry = path, CollectorRegistry()
        labels = {"labelnames": ["stage"], "registry": self.registry}
        self.last = Gauge("s2s_training_last_log_timestamp_seconds", "When the training last logged metrics",
                          **labels).labels(stage)
        self.step = Gauge("s2s_training_step", "The step last logged", **labels).labels(stage)
        self.running = Gauge("s2s_training_running", "1 while the training runs", **labels).labels(stage)
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int | None, running: bool) -> None:
        from prometheus_client import write_to_textfile

        self.last.set_to_current_time()
        if step is not None:
            self.step.set(step)
        self.running.set(1 if running else 0)
        write_to_textfile(str(self.path), self.registry)  # writes a temp file, then renames it


@contextlib.contextmanager
def tracked(tracker: RunTracker) -> Iterator[RunTracker]:
    """End the MLflow run as FAILED (or KILLED on Ctrl-C) when training raises."""
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
