"""Check that every pinned dependency installs on a device without a CUDA package.

For each device target (Raspberry Pi OS / JetPack on aarch64, Python 3.11 and 3.10) it asks
pip's resolver, with `--only-binary=:all: --platform ... --python-version ...` and nothing
downloaded beyond metadata (`pip install --dry-run --report`, the resolver `pip download`
uses), for the whole dependency closure of `pyproject.toml`'s pins, torch taken from
PyTorch's CPU wheel index as `scripts/setup.sh --device` takes it. It fails when a pin has no
binary wheel for the target, or when anything resolved is a CUDA runtime (nvidia-*, cuda-*,
triton ...).

Where the CPU index cannot be reached (this project's sandbox), it checks what it can and
says so: the closure of every pin that does not depend on torch, and a binary wheel for each
torch-dependent pin (torch included) on its own. Set REQUIRE_TORCH_CPU_INDEX=1 to make an
unreachable index a failure (as a CI with internet should).

Markers in our own pins (`python_version < '3.11'`) are evaluated for the target here; pip
evaluates markers of transitive requirements for the machine running it (x86_64 Linux in
CI), which can only add packages, never hide one. Runs on CI's Python (3.11: tomllib).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
CUDA_NAME = re.compile(r"^(nvidia-|cuda-|cupy|triton|pytorch-triton|nccl|cudnn|tensorrt)")
"""Distribution names (PEP 503-normalised) of GPU runtimes a Pi or a CPU device never needs."""


@dataclass(frozen=True)
class Target:
    name: str
    python_version: str
    platforms: tuple[str, ...]


TARGETS = (
    Target(
        "aarch64/cp311 (Pi OS Bookworm)",
        "3.11",
        ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
    ),
    Target(
        "aarch64/cp310 (JetPack 6)",
        "3.10",
        ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
    ),
)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cuda_packages(names: list[str]) -> list[str]:
    """The names among `names` that are CUDA / GPU runtime distributions."""
    return sorted(n for n in (normalise(name) for name in names) if CUDA_NAME.match(n))


def pins_for(python_version: str) -> list[Requirement]:
    """The project's runtime pins whose markers hold on a Linux aarch64 `python_version`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    environment = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "platform_machine": "aarch64",
        "sys_platform": "linux",
        "platform_system": "Linux",
    }
    pins = [Requirement(text) for text in project["dependencies"]]
    return [pin for pin in pins if pin.marker is None or pin.marker.evaluate(environment)]


def resolve(
    target: Target, requirements: list[str], indexes: list[str], *, deps: bool = True
) -> tuple[list[dict[str, object]], str]:
    """pip's resolution for `target`: (the report's install list, '') or ([], pip's error)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--quiet",
            "--ignore-installed", "--disable-pip-version-check", "--report", str(report),
            "--target", str(Path(scratch) / "target"), "--only-binary=:all:",
            "--python-version", target.python_version, "--implementation", "cp",
            "--index-url", indexes[0],
        ]  # fmt: skip
        for extra in indexes[1:]:
            command += ["--extra-index-url", extra]
        for platform in target.platforms:
            command += ["--platform", platform]
        if not deps:
            command.append("--no-deps")
        done = subprocess.run(command + requirements, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            return [], (errors[-1] if errors else done.stderr.strip()[-300:])
        installed: list[dict[str, object]] = json.loads(report.read_text())["install"]
        return installed, ""


def names_of(installed: list[dict[str, object]]) -> list[str]:
    return [str(item["metadata"]["name"]) for item in installed]  # type: ignore[index]


def _needs_torch(requirement: Requirement) -> bool:
    """A plain (not optional-extra) requirement on torch."""
    optional = requirement.marker is not None and "extra" in str(requirement.marker)
    return normalise(requirement.name) == "torch" and not optional


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/torch/", timeout=10) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_with_cpu_index(target: Target, pins: list[Requirement]) -> list[str]:
    installed, error = resolve(target, [str(p) for p in pins], [TORCH_CPU_INDEX, PYPI])
    if error:
        return [f"{target.name}: does not resolve: {error}"]
    names = names_of(installed)
    torch = [i for i in installed if normalise(str(i["metadata"]["name"])) == "torch"]  # type: ignore[index]
    wheel = str(torch[0]["download_info"]["url"]).rsplit("/", 1)[-1] if torch else "none"  # type: ignore[index]
    print(f"{target.name}: {len(names)} packages resolve; torch wheel {wheel}")
    cuda = cuda_packages(names)
    return [f"{target.name}: would install CUDA packages {', '.join(cuda)}"] if cuda else []


def check_without_cpu_index(target: Target, pins: list[Requirement]) -> list[str]:
    """Everything but torch's own closure: torch-dependent pins get a wheel check each."""
    by_name = {normalise(p.name): p for p in pins}
    rest = [p for name, p in by_name.items() if name != "torch"]
    installed, error = resolve(target, [str(p) for p in rest], [PYPI])
    if error:
        return [f"{target.name}: does not resolve: {error}"]
    dependents = {"torch"} | {
        normalise(str(item["metadata"]["name"]))  # type: ignore[index]
        for item in installed
        if any(
            _needs_torch(Requirement(text))
            for text in item["metadata"].get("requires_dist", [])  # type: ignore[attr-defined]
        )
    }
    closure = [p for name, p in by_name.items() if name not in dependents]
    installed, error = resolve(target, [str(p) for p in closure], [PYPI])
    if error:
        return [f"{target.name}: does not resolve: {error}"]
    failures = []
    cuda = cuda_packages(names_of(installed))
    if cuda:
        failures.append(f"{target.name}: would install CUDA packages {', '.join(cuda)}")
    wheels = [str(by_name[name]) for name in sorted(dependents) if name in by_name]
    _, error = resolve(target, wheels, [PYPI], deps=False)
    if error:
        failures.append(f"{target.name}: {error}")
    _, torch_error = resolve(target, [str(by_name["torch"])], [PYPI])
    pulled = sorted(set(re.findall(r"(nvidia-[a-z0-9-]+|triton)", torch_error)))
    print(
        f"{target.name}: closure of {len(closure)} pins without torch: {len(installed)} "
        f"packages, no CUDA; binary wheels exist for {', '.join(wheels)}; PyPI's torch "
        f"closure here: {'CUDA (' + ', '.join(pulled) + ')' if pulled else torch_error or 'ok'}"
    )
    return failures


def main() -> int:
    cpu_index = reachable(TORCH_CPU_INDEX)
    if not cpu_index:
        print(
            f"{TORCH_CPU_INDEX} unreachable: torch's CPU wheel closure NOT checked; "
            "checking every other pin's closure and each torch-dependent pin's wheel"
        )
        if os.environ.get("REQUIRE_TORCH_CPU_INDEX") == "1":
            return 1
    failures: list[str] = []
    for target in TARGETS:
        pins = pins_for(target.python_version)
        check = check_with_cpu_index if cpu_index else check_without_cpu_index
        failures += check(target, pins)
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
