"""The pipeline run inside scfm's image by real podman: `nextflow run . -profile test,podman`.

The image is built here from containers/Dockerfile on a Debian base made without any registry
(containers/build-base-image: debootstrap, then `podman import`), the same Dockerfile users build on
the CUDA base. What the build needs is cached between runs under $SCFM_TEST_CACHE (default
~/.cache/scfm-tests): the wheelhouse of requirements.lock, the base's root file system, podman's own
layer cache. On a fresh machine the test therefore builds everything (minutes: debootstrap, the
wheelhouse download, the pip install layer); afterwards only what changed (scfm's own code: one layer).

Then pretrain mode end to end with every task in the container, and `-resume` with nothing executed.
The proof that a task ran in the image: its versions.yml names the image (SCFM_CONTAINER, set only in
the image) with the lock hash the image's label records. What tasks write outside their work
directories (the SQLite MLflow store, the pretraining run directory) must reach the host.

Needs root (debootstrap), podman and runc: .ci/run installs them. Without podman the test skips,
unless SCFM_REQUIRE_CONTAINERS is set (CI sets it, so there it fails instead).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from nextflow_helpers import REPO, mlflow_runs, run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]

CACHE = Path(os.environ.get("SCFM_TEST_CACHE", Path.home() / ".cache" / "scfm-tests"))
BASE = "scfm-base:bookworm"


def scfm_version() -> str:
    text = (REPO / "src" / "scfm" / "__init__.py").read_text()
    return next(line.split('"')[1] for line in text.splitlines() if line.startswith("__version__"))


IMAGE = f"localhost/scfm:{scfm_version()}-bookworm"


def engine_environment() -> dict:
    """podman's settings for this host (containers/podman-host-conf), for the builds and the tasks."""
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "podman.conf"
    conf.write_text(subprocess.run([REPO / "containers" / "podman-host-conf"], check=True, capture_output=True,
                                   text=True).stdout)
    return {**os.environ, "CONTAINERS_CONF": str(conf), "SCFM_CACHE": str(CACHE), "CONTAINER_ENGINE": "podman"}


def build(command: list, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-6000:]
    return time.perf_counter() - start


def label(image: str, name: str, env: dict) -> str:
    return subprocess.run(["podman", "image", "inspect", "--format", f'{{{{index .Config.Labels "{name}"}}}}', image],
                          env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def image():
    if shutil.which("podman") is None:
        if os.environ.get("SCFM_REQUIRE_CONTAINERS"):
            pytest.fail("podman is missing (apt-get install podman runc debootstrap)")
        pytest.skip("podman is not installed (apt-get install podman runc debootstrap); CI installs it")
    env = engine_environment()
    timings = {}
    if subprocess.run(["podman", "image", "exists", BASE], env=env).returncode != 0:
        timings["base_s"] = build([REPO / "containers" / "build-base-image", "--tag", BASE,
                                   "--tarball", CACHE / "scfm-base-bookworm.tar"], env)
    timings["image_s"] = build([REPO / "containers" / "build-image", "--base", BASE, "--tag", IMAGE], env)
    print(f"container build times: {timings}")
    lock = label(IMAGE, "io.scfm.requirements-lock.sha256", env)
    return {"tag": IMAGE, "env": env, "name": f"scfm-{scfm_version()}+lock.{lock}", "lock": lock}


def test_image_records_the_lock_and_runs_scfm_as_a_user(image):
    import hashlib

    assert image["lock"] == hashlib.sha256((REPO / "requirements.lock").read_bytes()).hexdigest()
    assert label(image["tag"], "org.opencontainers.image.version", image["env"]) == scfm_version()
    ran = subprocess.run(["podman", "run", "--rm", image["tag"], "bash", "-c", "id -un; scfm --version"],
                         env=image["env"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["scfm", "scfm,", "version", scfm_version()]


@pytest.fixture(scope="module")
def contained(image, tmp_path_factory):
    """-profile test,podman (pretrain mode), then -resume of the same launch."""
    tmp = tmp_path_factory.mktemp("nf_podman")
    outdir = tmp / "out"
    args = ("--container", image["tag"])
    start = time.perf_counter()
    first = run_pipeline(tmp / "launch", outdir, "podman", *args, profile="test,podman", env=image["env"]).check()
    middle = time.perf_counter()
    resumed = run_pipeline(tmp / "launch", outdir, "resume", *args, profile="test,podman", env=image["env"],
                           resume=True).check()
    print(f"-profile test,podman: {middle - start:.0f} s; -resume: {time.perf_counter() - middle:.0f} s")
    return {"outdir": outdir, "first": first, "resumed": resumed}


def test_every_task_ran_in_the_image(image, contained):
    trace = contained["first"].trace
    assert {row["process"].split(":")[-1] for row in trace} >= {
        "MLFLOW_INIT", "QC", "VOCAB_BUILD", "ALIGN", "PRETRAIN", "FINETUNE", "EMBED", "ANNOTATE", "REPORT_ALL",
        "MLFLOW_FINISH"}
    for row in trace:
        assert row["status"] == "COMPLETED", row
        work = Path(row["workdir"])
        assert "podman run" in (work / ".command.run").read_text() and image["tag"] in (work / ".command.run").read_text()
        versions = yaml.safe_load((work / "versions.yml").read_text())
        (tools,) = versions.values()
        assert tools["container"] == image["name"], (row["name"], tools)


def test_what_tasks_write_outside_their_work_dirs_reaches_the_host(contained):
    outdir = contained["outdir"]
    runs = mlflow_runs(f"sqlite:///{outdir / 'mlflow' / 'mlflow.db'}")
    steps = {r.data.tags.get("scfm.step") for r in runs}
    assert {"pipeline", "qc", "pretrain", "finetune", "embed"} <= steps, steps
    assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags.get("scfm.step"), r.info.status) for r in runs]
    # the pretraining run directory (checkpoints for a retry) lives on the host, owned by the launching user
    (run_dir,) = (outdir / "pretrain" / "runs").iterdir()
    assert any((run_dir / "checkpoints").glob("step_*/scfm_checkpoint.json"))
    assert (outdir / "pretrain" / "model" / "model.safetensors").is_file()
    for path in (run_dir, outdir / "mlflow" / "mlflow.db", outdir / "annotated"):
        assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid()), path


def test_resume_in_the_container_runs_nothing(contained):
    resumed = contained["resumed"]
    assert resumed.trace and resumed.executed() == []
