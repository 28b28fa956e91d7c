"""scfm.tracking against real MLflow stores: SQLite files and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
from mlflow.tracking import MlflowClient

from scfm import tracking
from scfm.errors import ScfmError

N_WRITERS = 6
N_STEPS = 25


def _log_one_step_run(uri: str, index: int, parent: str | None) -> None:
    if parent:
        os.environ[tracking.PARENT_ENV] = parent
    with tracking.step_run("writer", uri=uri, run_name=f"writer-{index}", params={"index": index, "nested": {"a": 1}}) as run:
        for step in range(N_STEPS):
            run.log_metrics({"loss": 1.0 / (step + 1), "index": index}, step=step)
        run.set_tags({"writer": index})


def _run_writers_at_once(uri: str, parent: str | None = None) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_log_one_step_run, args=(uri, i, parent)) for i in range(N_WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * N_WRITERS


def _assert_every_write_landed(uri: str, parent: str | None = None) -> None:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`scfm.step` = 'writer'")
    assert sorted(r.data.params["index"] for r in runs) == sorted(str(i) for i in range(N_WRITERS))
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["nested.a"] == "1"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(N_STEPS))
        if parent:
            assert run.data.tags["mlflow.parentRunId"] == parent


@pytest.mark.slow
def test_writers_racing_on_a_fresh_sqlite_store_lose_nothing(tmp_path):
    # the store does not exist yet: every writer races to create it (the schema-migration race)
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    _run_writers_at_once(uri)
    _assert_every_write_landed(uri)


def test_parent_run_is_created_once_per_session_and_nests_steps(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tracking.ensure_parent_run(uri, "happy_turing", "session-1")
    again = tracking.ensure_parent_run(uri, "happy_turing", "session-1")
    other = tracking.ensure_parent_run(uri, "sad_turing", "session-2")
    assert first == again != other

    monkeypatch.setenv(tracking.PARENT_ENV, first)
    with tracking.step_run("qc", uri=uri, params={"min_genes": 200}) as run:
        run.log_metrics({"cells_out": 10})
    client = MlflowClient(uri)
    child = client.get_run(run.run_id)
    assert child.data.tags["mlflow.parentRunId"] == first
    assert child.data.params["min_genes"] == "200"
    assert child.data.metrics["cells_out"] == 10


def test_failed_step_is_marked_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError):
        with tracking.step_run("qc", uri=uri) as run:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FAILED"


def test_a_new_default_store_is_created_only_once_the_step_has_something_to_log(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "new"
    uri = tracking.resolve_uri(None, out)
    with pytest.raises(RuntimeError):
        with tracking.step_run("embed", uri=uri, params={"a": 1}):
            raise RuntimeError("bad input, found before anything was logged")
    assert not out.exists()  # no folder holding only mlflow.db and its lock

    started = time.time()
    with tracking.step_run("embed", uri=uri, params={"a": 1}) as run:
        run.log_metrics({"n_cells": 3})
    logged = MlflowClient(uri).get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.data.params["a"] == "1"
    assert logged.info.start_time <= logged.info.end_time and logged.info.start_time / 1000 >= started - 1

    # once the store exists, a failure is recorded like any other
    with pytest.raises(RuntimeError):
        with tracking.step_run("embed", uri=tracking.resolve_uri(None, out)) as failed:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(failed.run_id).info.status == "FAILED"


def test_artifacts_land_next_to_the_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    with tracking.step_run("report", uri=uri) as run:
        run.log_dict({"ari": 0.5}, "metrics.json")
    assert (tmp_path / "store" / "mlartifacts").is_dir()
    names = [f.path for f in MlflowClient(uri).list_artifacts(run.run_id)]
    assert names == ["metrics.json"]


def test_default_uri_is_sqlite_in_the_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.resolve_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/y.db")
    assert tracking.resolve_uri(None, tmp_path) == "sqlite:////x/y.db"


def test_mlflow_init_command_prints_the_same_parent_on_resume(tmp_path, scfm_bin):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ("--mlflow-uri", uri, "--run-name", "r", "--session-id", "abc")
    first = scfm_bin("mlflow-init", *args).stdout.strip()
    second = scfm_bin("mlflow-init", *args).stdout.strip()
    assert first and first == second


@pytest.mark.slow
def test_concurrent_writers_to_one_server_lose_nothing(mlflow_server):
    parent = tracking.ensure_parent_run(mlflow_server, "pipeline", "session-9")
    _run_writers_at_once(mlflow_server, parent=parent)
    _assert_every_write_landed(mlflow_server, parent=parent)


def _log_under_session(uri: str, index: int, session: str) -> None:
    os.environ[tracking.SESSION_ENV] = session
    with tracking.step_run("writer", uri=uri, run_name=f"writer-{index}") as run:
        run.log_metrics({"index": index})


@pytest.mark.slow
def test_steps_of_a_session_find_or_create_one_parent_in_a_fresh_store(tmp_path):
    """A pipeline's steps get only the session id; racing into a store without the parent run, they
    create it once between them (a new --outdir after -resume)."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_log_under_session, args=(uri, i, "session-x")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * 4
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`scfm.step` = 'pipeline'")
    assert len(parents) == 1 and parents[0].data.tags["scfm.session_id"] == "session-x"
    children = client.search_runs([experiment.experiment_id], filter_string="tags.`scfm.step` = 'writer'")
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


def test_an_explicit_parent_run_wins_over_the_session(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    explicit = tracking.ensure_parent_run(uri, "demo", "session-a")
    monkeypatch.setenv(tracking.SESSION_ENV, "session-b")
    monkeypatch.setenv(tracking.PARENT_ENV, explicit)
    assert tracking.current_parent_run_id(uri) == explicit
    monkeypatch.delenv(tracking.PARENT_ENV)
    assert tracking.current_parent_run_id(uri) == tracking.ensure_parent_run(uri, None, "session-b") != explicit


def test_mlflow_finish_ends_the_sessions_parent_run(tmp_path, scfm_bin):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = scfm_bin("mlflow-init", "--session-id", "s1", env={"MLFLOW_TRACKING_URI": uri}).stdout.strip()
    assert MlflowClient(uri).get_run(parent).info.status == "RUNNING"
    ended = scfm_bin("mlflow-finish", "--session-id", "s1", "--mlflow-uri", uri).stdout.strip()
    assert ended == parent and MlflowClient(uri).get_run(parent).info.status == "FINISHED"
    missing = scfm_bin("mlflow-finish", "--session-id", "s1", check=False, env={"MLFLOW_TRACKING_URI": ""})
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error:")


def test_retry_window_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(tracking.RETRY_ENV, "0")
    calls = []

    def locked():
        calls.append(1)
        raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError, match="locked"):
        tracking._retry(locked)
    assert len(calls) == 1  # no time to retry
    monkeypatch.setenv(tracking.RETRY_ENV, "soon")
    with pytest.raises(ScfmError, match="SCFM_MLFLOW_RETRY_SECONDS"):
        tracking.retry_seconds()
