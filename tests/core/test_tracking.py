"""scfm.tracking against real MLflow stores: SQLite files and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
from mlflow.tracking import MlflowClient

from scfm import tracking

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
