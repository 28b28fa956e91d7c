"""The only module that talks to MLflow.

Every step opens one run with :func:`step_run`. Runs nest under a parent run: the one named by
``SCFM_MLFLOW_PARENT_RUN_ID``, or, in the Nextflow pipeline, the one tagged with the session id in
``SCFM_PIPELINE_SESSION`` (created once per session; ``-resume`` keeps the session). The default
store is an SQLite file in the step's output directory; ``--mlflow-uri`` or ``MLFLOW_TRACKING_URI``
point elsewhere (a server).

Concurrency: many pipeline tasks log into one store at once. Creating an SQLite store runs schema
migrations, which race when several processes open a fresh file together, so creation happens under
an exclusive file lock; afterwards every write is retried on transient "database is locked" errors
for up to ``SCFM_MLFLOW_RETRY_SECONDS`` (default 300). SQLite suits tens of concurrent writers on a
file system with working POSIX locks; beyond that, use a tracking server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from scfm.errors import ScfmError

PARENT_ENV = "SCFM_MLFLOW_PARENT_RUN_ID"
SESSION_ENV = "SCFM_PIPELINE_SESSION"
RETRY_ENV = "SCFM_MLFLOW_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
DEFAULT_EXPERIMENT = "scfm"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
_T = TypeVar("_T")


class DefaultStoreUri(str):
    """The store scfm chose itself (next to the step's output), as opposed to one the user named.

    :func:`step_run` creates a default store that does not exist yet only once the step has something
    to log, so that a step failing on bad input leaves no ``mlflow.db`` in a new output folder.
    """


def resolve_uri(mlflow_uri: str | None, output_dir: str | os.PathLike | None) -> str:
    """Explicit flag, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<output_dir>/mlflow.db`` (a
    :class:`DefaultStoreUri`)."""
    if mlflow_uri:
        return mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = Path(output_dir if output_dir is not None else ".").resolve()
    return DefaultStoreUri(f"sqlite:///{base / 'mlflow.db'}")


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def retry_seconds() -> float:
    """How long transient store errors are retried: ``SCFM_MLFLOW_RETRY_SECONDS`` or 300."""
    text = os.environ.get(RETRY_ENV, "")
    try:
        value = float(text) if text else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise ScfmError(f"{RETRY_ENV}={text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ScfmError(f"{RETRY_ENV}={text!r} must be a finite number of seconds >= 0")
    return value


def _retry(fn: Callable[[], _T], window: float | None = None) -> _T:
    """Run an MLflow call, retrying transient lock/connection errors with jittered backoff."""
    deadline = time.monotonic() + (retry_seconds() if window is None else window)
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # MLflow wraps SQLAlchemy/HTTP errors in several types
            text = str(exc).lower()
            transient = any(s in text for s in ("locked", "busy", "connection", "timed out", "temporarily"))
            pause = min(5.0, 0.05 * 2**attempt) * (0.5 + random.random())
            if not transient or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            attempt += 1


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive lock next to an SQLite store (creating its folder); nothing for a server."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_store(uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create the store (for SQLite, under a lock) and the experiment; return the experiment id."""
    db = sqlite_path(uri)
    artifacts = (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None
    with store_lock(uri):
        return _retry(lambda: _get_or_create_experiment(_client(uri), experiment, artifacts))


def _get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        # another process created it between our lookup and create (server stores have no file lock)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; values cut to MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:_MAX_PARAM_CHARS]
    return flat


class StepRun:
    """One MLflow run; every write is retried and goes through the client (no global MLflow state).

    Made with ``opener`` instead of a client and run id, the run is created on first use.
    """

    def __init__(self, client=None, run_id: str | None = None, uri: str | None = None, *,
                 opener: Callable[[], tuple[Any, str]] | None = None):
        self._client, self._run_id = client, run_id
        self.uri = uri
        self._opener = opener

    @property
    def opened(self) -> bool:
        return self._run_id is not None

    def open(self) -> None:
        if self._run_id is None:
            self._client, self._run_id = self._opener()

    @property
    def client(self):
        self.open()
        return self._client

    @property
    def run_id(self) -> str:
        self.open()
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for start in range(0, len(items), 100):  # MLflow caps one batch at 100 params
            batch = items[start : start + 100]
            _retry(lambda: self.client.log_batch(self.run_id, params=batch))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        if items:
            _retry(lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            _retry(lambda: self.client.log_batch(self.run_id, tags=items))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = os.fspath(path)
        if os.path.isdir(path):
            _retry(lambda: self.client.log_artifacts(self.run_id, path, artifact_path))
        else:
            _retry(lambda: self.client.log_artifact(self.run_id, path, artifact_path))

    def log_dict(self, obj: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            target.write_text(json.dumps(obj, indent=2, default=str))
            self.log_artifact(target)


class _DisabledRun:
    """Stands in on non-zero ranks, which must not log: same methods, nothing written."""

    run_id = None
    uri = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def step_run(
    step: str,
    *,
    uri: str,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    enabled: bool = True,
) -> Iterator[StepRun | _DisabledRun]:
    """Open one MLflow run for a step; FINISHED on success, FAILED on any exception."""
    if not enabled:
        yield _DisabledRun()
        return
    from scfm import __version__

    started_ms = int(time.time() * 1000)

    def open_run() -> tuple[Any, str]:
        try:
            experiment_id = ensure_store(uri, experiment)
        except Exception as exc:
            raise ScfmError(f"cannot open the MLflow store: {exc}", uri) from exc
        client = _client(uri)
        all_tags = {"scfm.step": step, "scfm.version": __version__}
        parent = current_parent_run_id(uri, experiment)
        if parent:
            parent_run = _retry(lambda: client.get_run(parent))
            experiment_id = parent_run.info.experiment_id
            all_tags["mlflow.parentRunId"] = parent
        all_tags.update(tags or {})
        run = _retry(
            lambda: client.create_run(experiment_id, run_name=run_name or step, start_time=started_ms,
                                      tags={k: str(v) for k, v in all_tags.items()})
        )
        if params:
            StepRun(client, run.info.run_id, uri).log_params(params)
        return client, run.info.run_id

    handle = StepRun(uri=uri, opener=open_run)
    if not _new_default_store(uri):
        handle.open()  # a named store or server is opened now, so that a bad one fails before any work
    try:
        yield handle
    except BaseException as exc:
        if handle.opened:
            # an exception may say how the run ended (a preempted run is KILLED, not FAILED)
            status = getattr(exc, "run_status", "FAILED")
            _retry(lambda: handle.client.set_terminated(handle.run_id, status))
        raise
    _retry(lambda: handle.client.set_terminated(handle.run_id, "FINISHED"))


def _new_default_store(uri: str) -> bool:
    db = sqlite_path(uri)
    return isinstance(uri, DefaultStoreUri) and db is not None and not db.exists()


def _pipeline_query(session_id: str) -> str:
    return f"tags.`scfm.session_id` = '{session_id}' and tags.`scfm.step` = 'pipeline'"


def ensure_parent_run(
    uri: str, run_name: str | None, session_id: str, experiment: str = DEFAULT_EXPERIMENT
) -> str:
    """Return the pipeline's parent run for ``session_id``, creating it once.

    Keyed on the Nextflow session id, which ``-resume`` keeps: a resumed pipeline logs into the
    run it started with instead of opening a duplicate. Lookup and creation happen under the store's
    lock, so steps that find a new store create one parent between them, not one each.
    """
    experiment_id = ensure_store(uri, experiment)
    client = _client(uri)
    with store_lock(uri):
        existing = _retry(
            lambda: client.search_runs([experiment_id], filter_string=_pipeline_query(session_id), max_results=1)
        )
        if existing:
            return existing[0].info.run_id
        name = run_name or f"pipeline-{session_id[:8]}"
        run = _retry(
            lambda: client.create_run(
                experiment_id,
                run_name=name,
                tags={"scfm.step": "pipeline", "scfm.session_id": session_id, "scfm.run_name": name},
            )
        )
    return run.info.run_id


def current_parent_run_id(uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """The parent run this process logs under: ``SCFM_MLFLOW_PARENT_RUN_ID``, else the pipeline
    session's run (``SCFM_PIPELINE_SESSION``), else none."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    session_id = os.environ.get(SESSION_ENV)
    if session_id:
        return ensure_parent_run(uri, None, session_id, experiment)
    return None


def finish_parent_run(uri: str, session_id: str, status: str = "FINISHED", experiment: str = DEFAULT_EXPERIMENT) -> str:
    """End the parent run of ``session_id`` with ``status``; return its id."""
    run_id = ensure_parent_run(uri, None, session_id, experiment)
    client = _client(uri)
    _retry(lambda: client.set_terminated(run_id, status))
    return run_id
