"""Fixtures shared by every test area."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / "bin"

os.environ.setdefault("SCFM_PROGRESS", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their own stores
os.environ.pop("SCFM_MLFLOW_PARENT_RUN_ID", None)


@pytest.fixture(scope="session")
def pbmc_counts():
    """700 real PBMCs with integer counts and labels (see scfm.data.demo_data). Copy before mutating."""
    from scfm.data.demo_data import pbmc68k_counts

    return pbmc68k_counts()


@pytest.fixture(scope="session")
def train_data(pbmc_counts, tmp_path_factory):
    """The 700 real PBMCs for training and pipeline tests.

    dict of paths: vocab (TSV), shards (dir, row groups of 50 cells), aligned (h5ad), checkpoint (tiny, random)."""
    from scfm.data.shards import ShardWriter
    from scfm.data.vocab import Vocabulary
    from scfm.model.checkpoint import save_checkpoint
    from scfm.model.config import ModelConfig
    from scfm.model.xtrimogene import XTrimoGene

    root = tmp_path_factory.mktemp("train_data")
    adata = pbmc_counts.copy()
    vocab = Vocabulary(list(adata.var_names))
    vocab.save(root / "vocab.tsv")
    with ShardWriter(root / "shards", vocab, ["bulk_labels"], cells_per_shard=350, row_group_size=50) as writer:
        writer.write(list(adata.obs_names), adata.X, adata.obs)
    adata.uns["scfm"] = {"vocab_sha256": vocab.sha256, "counts_source": "X"}
    adata.write_h5ad(root / "pbmc.aligned.h5ad")
    config = ModelConfig.preset("tiny", n_genes=len(vocab))
    save_checkpoint(root / "tiny_random", XTrimoGene(config, seed=0), config, vocab)
    return {"root": root, "vocab": root / "vocab.tsv", "shards": root / "shards",
            "aligned": root / "pbmc.aligned.h5ad", "checkpoint": root / "tiny_random", "vocab_obj": vocab}


def run_bin(step: str, *args, check: bool = True, env: dict | None = None, cwd=None):
    """Run ``bin/scfm-<step>`` as a subprocess with this interpreter, as the pipeline would."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(BIN / f"scfm-{step}"), *map(str, args)],
        capture_output=True, text=True, env=full_env, cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"scfm-{step} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def scfm_bin():
    """``scfm_bin("qc", "in.h5ad", "-o", "out.h5ad", check=False)`` → CompletedProcess (session-wide, so that
    module fixtures can run steps too; ``from conftest import`` would find another folder's conftest)."""
    return run_bin


def signal_when(proc, ready, *, signum=None, timeout: float = 240, what: str = "") -> int:
    """Send ``signum`` (SIGTERM) to a running step as soon as ``ready()``; return its exit code.

    Fails when the step ends before it could be stopped, or never gets ready.
    """
    import signal

    try:
        deadline = time.time() + timeout
        while not ready():
            assert proc.poll() is None, f"finished before it could be stopped:\n{what() if callable(what) else what}"
            assert time.time() < deadline, "never got going"
            time.sleep(0.02)
        proc.send_signal(signum or signal.SIGTERM)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


@pytest.fixture(scope="session")
def stop_when_ready():
    """:func:`signal_when`, for tests and fixtures of any scope."""
    return signal_when


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (free port, SQLite backend in tmp_path); yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("mlflow server did not start")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def go_dir():
    """The GO databases from `make go` (scfm.data.go.default_go_dir()). Missing: skip, or fail where CI sets
    SCFM_REQUIRE_GO=1, so that CI cannot pass by skipping them."""
    from scfm.data.go import default_go_dir, resolve_go_dir
    from scfm.errors import ScfmError

    try:
        return resolve_go_dir(None)
    except ScfmError:
        reason = f"GO databases not installed in {default_go_dir()} (run `make go`)"
        if os.environ.get("SCFM_REQUIRE_GO") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def find_shared_data() -> Path | None:
    """The project's real-data folder: $SCFM_SHARED_DATA, else the first ``shared/data`` beside the checkout
    or one of its parents (``../shared/data`` from the project's root, ``../../shared/data`` from a worktree)."""
    if os.environ.get("SCFM_SHARED_DATA"):
        return Path(os.environ["SCFM_SHARED_DATA"])
    for parent in REPO.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


@pytest.fixture(scope="session")
def shared_data():
    """Path of the shared real data (read-only); skips when it is absent."""
    found = find_shared_data()
    if found is None or not found.is_dir():
        pytest.skip("the shared real-data folder (../shared/data) is absent")
    return found
