"""Benchmark: `-profile test` in scfm's image (podman) next to the same run without a container.

    python bench/container.py [--image localhost/scfm:0.1.0-bookworm] [--workdir bench/container_out]

Runs `nextflow run . -profile test,local` and `-profile test,podman --container IMAGE` (pretrain mode on the
bundled demo, the same parameters), one after the other, then `-resume` of the container run (nothing
executes). Prints the wall time of each launch, their ratio, the image's size and the machine with its load.
Build the image first (`make base-image && make image BASE_IMAGE=scfm-base:bookworm IMAGE_TAG=...`); set
CONTAINERS_CONF where podman needs the host settings of containers/podman-host-conf.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "pipeline"))
sys.path.insert(0, str(REPO / "bench"))

from nextflow_helpers import run_pipeline  # noqa: E402
from pipeline import machine, timed  # noqa: E402


def image_size_mb(image: str) -> int:
    size = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image], check=True,
                          capture_output=True, text=True).stdout
    return int(size) // 1_000_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="localhost/scfm:0.1.0-bookworm")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "container_out")
    args = parser.parse_args()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    info = {**machine(), "image": args.image, "image_mb": image_size_mb(args.image)}
    print(json.dumps(info), flush=True)
    walls = {}
    for profile, extra in (("test,local", []), ("test,podman", ["--container", args.image])):
        root = args.workdir / profile.replace(",", "_")
        launch, walls[profile] = timed(lambda: run_pipeline(root / "launch", root / "out", "bench", *extra,
                                                            profile=profile).check())
        print(json.dumps({"profile": profile, "tasks": len(launch.trace), "wall_s": round(walls[profile], 1)}),
              flush=True)
    root = args.workdir / "test_podman"
    resumed, resume_wall = timed(lambda: run_pipeline(root / "launch", root / "out", "resume", "--container",
                                                      args.image, profile="test,podman", resume=True).check())
    assert resumed.executed() == [], resumed.executed()
    result = {"container_over_local": round(walls["test,podman"] / walls["test,local"], 2),
              "resume_in_container_s": round(resume_wall, 1), "load_1min_after": round(os.getloadavg()[0], 1)}
    print(json.dumps(result))
    (args.workdir / "results.json").write_text(json.dumps({"machine": info, "walls": walls, **result}, indent=2))


if __name__ == "__main__":
    main()
