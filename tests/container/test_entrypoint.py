"""container/entrypoint dispatches its first argument and execs, so the server becomes PID 1."""

import os
import subprocess
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[2] / "container" / "entrypoint"

# Stands in for the real console script: reports the PID it runs as and the argv it was given.
FAKE_ONEBOX = """#!/bin/sh
echo "pid=$$"
for arg in "$@"; do echo "arg=$arg"; done
exit "${FAKE_ONEBOX_EXIT:-0}"
"""


@pytest.fixture
def env_with_fake_onebox(tmp_path):
    """Environment whose PATH finds the fake ``onebox`` first."""
    fake = tmp_path / "onebox"
    fake.write_text(FAKE_ONEBOX)
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}


def run_entrypoint(args: list[str], env: dict[str, str]) -> tuple[int, int, list[str]]:
    """Run the entrypoint; return (its PID, its exit status, the lines it printed)."""
    process = subprocess.Popen([str(ENTRYPOINT), *args], env=env, stdout=subprocess.PIPE, text=True)
    stdout, _ = process.communicate(timeout=10)
    return process.pid, process.returncode, stdout.splitlines()


def test_entrypoint_is_executable():
    assert os.access(ENTRYPOINT, os.X_OK)


def test_serve_execs_onebox_serve_with_remaining_arguments(env_with_fake_onebox):
    pid, status, lines = run_entrypoint(["serve", "/opt/ml/model", "two words"], env_with_fake_onebox)
    assert status == 0
    assert lines == [f"pid={pid}", "arg=serve", "arg=/opt/ml/model", "arg=two words"]


def test_no_arguments_means_serve(env_with_fake_onebox):
    pid, _, lines = run_entrypoint([], env_with_fake_onebox)
    assert lines == [f"pid={pid}", "arg=serve"]


def test_detect_execs_onebox_detect(env_with_fake_onebox):
    pid, _, lines = run_entrypoint(["detect", "/opt/ml/model"], env_with_fake_onebox)
    assert lines == [f"pid={pid}", "arg=detect", "arg=/opt/ml/model"]


def test_other_commands_are_executed_as_given(env_with_fake_onebox):
    pid, _, lines = run_entrypoint(
        ["sh", "-c", 'echo "pid=$$ args=$*"', "sh", "a", "b"], env_with_fake_onebox
    )
    assert lines == [f"pid={pid} args=a b"]


def test_server_exit_status_becomes_the_container_exit_status(env_with_fake_onebox):
    _, status, _ = run_entrypoint(["serve"], {**env_with_fake_onebox, "FAKE_ONEBOX_EXIT": "3"})
    assert status == 3
