"""requirements.lock (installed by `make` and by the container images) pins every dependency of pyproject.toml,
the optional `bench` ones included (the benchmarks' slow tests run in CI)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]


def read_lock(path: Path) -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"{path.name}:{number}: not an exact pin: {line!r}"
        pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bench = project.get("optional-dependencies", {}).get("bench", [])
    return [Requirement(r) for r in [*project["dependencies"], *bench]]


def unsatisfied(requirements: list[Requirement], pins: dict[str, Version]) -> list[str]:
    problems = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name} is not pinned")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req.name}=={pinned} does not satisfy {req.specifier}")
    return problems


def test_lock_pins_every_dependency_within_its_specifier():
    pins = read_lock(REPO / "requirements.lock")
    assert unsatisfied(project_requirements(), pins) == []


def test_lock_has_no_duplicates_and_not_the_package_itself():
    names = [canonicalize_name(l.split("==")[0]) for l in (REPO / "requirements.lock").read_text().splitlines()
             if l.strip() and not l.lstrip().startswith("#")]
    assert len(names) == len(set(names))
    assert "scfm" not in names  # installed with --no-deps after the lock


def test_check_catches_a_missing_and_a_wrong_pin(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\ntorch==2.12.0\nnumpy==2.4.6\n")
    problems = unsatisfied([Requirement("torch==2.13.0"), Requirement("numpy>=1.26"), Requirement("click>=8")],
                           read_lock(lock))
    assert problems == ["torch==2.12.0 does not satisfy ==2.13.0", "click is not pinned"]


def test_the_image_installs_the_lock_offline_then_the_package():
    dockerfile = (REPO / "containers" / "Dockerfile").read_text()
    assert "requirements.lock" in dockerfile
    installs = re.findall(r"pip install[^\n]*", dockerfile)
    assert installs and all("--no-index" in line for line in installs), installs
    assert re.search(r"pip install[^\n]*--no-deps[^\n]*/opt/scfm-src", dockerfile)
    assert dockerfile.index("requirements.lock") < dockerfile.index("--no-deps")
    # one Dockerfile on any base; by default a pinned CUDA runtime image
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", base), base
    assert re.search(r"^USER\s+(?!root)\w+", dockerfile, re.M), "the image must not run as root"
