"""examples/nbclient/ run for real: run_notebook.py and `jupyter nbconvert --execute`.

Each test installs a limited kernelspec (with the CLI, as the example's README does) into
a temp JUPYTER_PATH, gives the run a private state dir, runs the example as a user would
(a subprocess) and checks that the runaway cell's error names the limit that stopped it.
Whatever happened, every kernel in that state dir is removed afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from limited_provisioner.cli import main as cli
from limited_provisioner.reaper import remove_kernel
from limited_provisioner.registry import STATE_DIR_ENV, Registry

from .conftest import TEST_OWNER
from .harness import KERNEL_IMAGE

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "nbclient"
RUN_TIMEOUT = 60


@pytest.fixture
def example_env(tmp_path):
    """``install(*flags)`` -> env for running the example against that kernelspec."""
    state_dir = tempfile.mkdtemp(prefix="lp-", dir="/var/lib")
    prefix = tmp_path / "prefix"

    def install(*flags: str) -> dict[str, str]:
        if "docker" in flags:
            flags = (*flags, "--image", KERNEL_IMAGE)
        assert cli(["install", "--prefix", str(prefix), *flags]) == 0
        env = dict(os.environ)
        env["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
        env[STATE_DIR_ENV] = state_dir
        return env

    yield install

    registry = Registry(state_dir)
    for entry in registry.entries():
        remove_kernel(registry, entry)
    shutil.rmtree(state_dir, ignore_errors=True)


def run_example(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run one example command; on timeout kill it (its own session) and fail."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{args} still running after {RUN_TIMEOUT}s\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("process", id="process"),
        pytest.param("docker", id="docker", marks=pytest.mark.docker),
    ],
)
def test_run_notebook_reports_exec_timeout(example_env, backend, request):
    if backend == "docker":
        request.getfixturevalue("docker_client")  # skips (or fails in CI) without Docker
    env = example_env("--backend", backend, "--exec-timeout", "2s", "--mem-limit", "256M")
    if backend == "docker":
        env["JUPYTERHUB_USER"] = TEST_OWNER  # the owner; the session fixture removes these

    result = run_example([sys.executable, "run_notebook.py"], env, EXAMPLE)

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.strip() == (
        "cell 2 failed: TimeoutError: execution exceeded exec_timeout=2s and was "
        "interrupted by limited-provisioner"
    ), result.stderr


def test_run_notebook_reports_memory_limit_of_dead_kernel(example_env):
    env = example_env("--mem-limit", "256M")

    result = run_example([sys.executable, "run_notebook.py", "oom.ipynb"], env, EXAMPLE)

    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "cell 2: DeadKernelError: Kernel died", result.stdout + result.stderr
    assert "memory limit 256M exceeded" in lines[1], result.stdout + result.stderr


def test_nbconvert_execute_shows_exec_timeout(example_env, tmp_path):
    env = example_env("--exec-timeout", "2s")
    notebook = tmp_path / "runaway.ipynb"
    shutil.copy(EXAMPLE / "runaway.ipynb", notebook)

    result = run_example(
        [
            sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
            "--ExecutePreprocessor.kernel_name=limited-python", "runaway.ipynb",
        ],
        env,
        tmp_path,
    )

    assert result.returncode == 1, result.stderr
    assert "CellExecutionError" in result.stderr
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stderr)  # colours differ between IPythons
    assert (
        "TimeoutError: execution exceeded exec_timeout=2s and was interrupted by "
        "limited-provisioner" in plain
    ), result.stderr
