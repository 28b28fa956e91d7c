"""Benchmark: what Nextflow costs on top of the same steps run directly, and what a -resume costs.

    python bench/pipeline.py                      # every mode, results in bench/pipeline_out/
    python bench/pipeline.py --mode pretrain --workdir /tmp/pipe

For each mode it runs `nextflow run . -profile test,local` on the bundled demo (wall time of the whole
launch, JVM start included), then runs the very same task scripts directly: every task's `.command.sh`
from the Nextflow work directory, copied with its staged inputs into a fresh folder, in the order the
pipeline ran them and with the same parallelism (two at a time, as the test profile's two CPUs allow,
each stage after the one it depends on). The ratio of the two wall times is the orchestration overhead.
Then `-resume` of the finished run (nothing executes) is timed. Machine and Nextflow version are printed.

Needs the Nextflow runtime (`make nextflow`) and the project installed (`make`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo"
sys.path.insert(0, str(REPO / "tests" / "pipeline"))

from nextflow_helpers import nextflow_executable, run_pipeline, task_environment  # noqa: E402

# modes on the demo; embed and finetune start from the model the pretrain run makes
MODES = ("pretrain", "finetune", "embed")


def mode_args(mode: str, pretrained: Path | None) -> list:
    if mode == "pretrain":
        return []
    assert pretrained is not None, "pretrain runs first"
    return ["--mode", mode, "--checkpoint", pretrained / "pretrain" / "model"]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def outputs_of_the_task(folder: str, names: list[str]) -> list[str]:
    """What a copied task folder leaves out: all but its scripts and its staged inputs (symlinks, also in
    the subfolders `stageAs` makes)."""
    def kept(name: str) -> bool:
        path = os.path.join(folder, name)
        return name.startswith(".command") or os.path.islink(path) or os.path.isdir(path)

    return [n for n in names if not kept(n)]


def direct_chain(trace: list[dict], workdir: Path, outdir: Path) -> float:
    """Run every task's script again outside Nextflow, stage by stage, two tasks at a time."""
    env = task_environment()  # drops any MLflow or session variable of this shell; the tasks get their own
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
                "SCFM_PRETRAIN_RUNS_DIR": str(workdir / "runs"), "SCFM_PIPELINE_SESSION": "direct-chain"})
    env["PATH"] = f"{REPO / 'bin'}:{env['PATH']}"
    # a stage: the tasks Nextflow submitted while the previous stage's outputs were all it needed
    stages: dict[str, list[dict]] = {}
    for row in sorted(trace, key=lambda r: int(r["task_id"])):
        stages.setdefault(row["process"], []).append(row)

    def run(row: dict) -> None:
        copy = workdir / "tasks" / row["hash"].replace("/", "_")
        shutil.copytree(row["workdir"], copy, symlinks=True, ignore=outputs_of_the_task)
        done = subprocess.run(["bash", "-euo", "pipefail", ".command.sh"], cwd=copy, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{row['name']} outside Nextflow exited {done.returncode}: {done.stderr[-2000:]}")

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for rows in stages.values():
            list(pool.map(run, rows))
    return time.perf_counter() - start


def bench_mode(mode: str, root: Path, pretrained: Path | None) -> dict:
    launch_dir, outdir = root / mode / "launch", root / mode / "out"
    launch, wall = timed(lambda: run_pipeline(launch_dir, outdir, "bench", *mode_args(mode, pretrained)).check())
    trace = [row for row in launch.trace if row["status"] == "COMPLETED"]
    direct = direct_chain(trace, root / mode / "direct", outdir)
    resumed, resume_wall = timed(lambda: run_pipeline(launch_dir, outdir, "resume", *mode_args(mode, pretrained),
                                                      resume=True).check())
    assert resumed.executed() == [], resumed.executed()
    return {"mode": mode, "tasks": len(trace), "nextflow_s": round(wall, 1), "direct_s": round(direct, 1),
            "overhead_ratio": round(wall / direct, 2), "resume_s": round(resume_wall, 1)}


def machine() -> dict:
    version = subprocess.run([str(nextflow_executable()), "-version"], capture_output=True, text=True,
                             env=task_environment()).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nextflow": next((line.split()[1] for line in version.splitlines() if "version" in line), "?"),
            "cpu": cpu, "cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", action="append", choices=MODES, help="modes to run (default: all)")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "pipeline_out")
    args = parser.parse_args()
    modes = args.mode or list(MODES)
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    info = machine()
    print(json.dumps(info))
    results, pretrained = [], None
    for mode in MODES:
        if mode not in modes and not (mode == "pretrain" and pretrained is None and set(modes) - {"pretrain"}):
            continue
        result = bench_mode(mode, args.workdir, pretrained)
        if mode == "pretrain":
            pretrained = args.workdir / "pretrain" / "out"
        results.append(result)
        print(json.dumps(result), flush=True)
    info["load_1min_after"] = round(os.getloadavg()[0], 1)
    (args.workdir / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
