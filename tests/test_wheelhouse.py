"""Packages without network: a kernel with ``network=false`` installs from the operator's
wheelhouse (wheelhouse.py) into its own HOME and imports at once, on both backends."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

from limited_provisioner.errors import LimitConfigError

from .conftest import backends, run
from .harness import AgentBackendService, remove_all_kernels

# Pure Python, on PyPI, and in neither /opt/venv nor the kernel image (checked below).
PACKAGE = "tabulate"
SDIST_ONLY = "lpsdistonly"
CLI = [sys.executable, "-m", "limited_provisioner.cli"]


def _sdist(dest: Path, name: str) -> None:
    """A source distribution whose build would leave ~/BUILT behind."""
    setup = (
        "import os\n"
        "open(os.path.expanduser('~/BUILT'), 'w').close()\n"
        f"from setuptools import setup\nsetup(name={name!r}, version='1.0')\n"
    ).encode()
    info = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode()
    with tarfile.open(dest / f"{name}-1.0.tar.gz", "w:gz") as tar:
        for member, data in (("setup.py", setup), ("PKG-INFO", info)):
            entry = tarfile.TarInfo(f"{name}-1.0/{member}")
            entry.size, entry.mode = len(data), 0o644
            tar.addfile(entry, io.BytesIO(data))


@pytest.fixture(scope="module")
def wheelhouse():
    """A wheelhouse filled by ``limited-provisioner wheelhouse add`` (pip's cache or
    PyPI), plus an sdist-only package; under /var/lib, not /tmp (kernels get their own)."""
    where = Path(tempfile.mkdtemp(prefix="lp-wheelhouse-", dir="/var/lib"))
    try:
        where.chmod(0o755)
        subprocess.run([*CLI, "wheelhouse", "add", PACKAGE, "--dir", str(where)],
                       check=True, capture_output=True, text=True)
        _sdist(where, SDIST_ONLY)
        (where / f"{SDIST_ONLY}-1.0.tar.gz").chmod(0o644)
        yield str(where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_package_absent_from_the_kernels_own_environment():
    """Else the install below would prove nothing."""
    absent = subprocess.run([sys.executable, "-c", f"import {PACKAGE}"], check=False,
                            capture_output=True)
    assert absent.returncode != 0


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_install_from_wheelhouse_without_network(
    backend, own_state, start_kernel, wheelhouse
):
    config = {"network": False, "mem_limit": "512M", "disk_limit": "200M",
              "wheelhouse": wheelhouse}
    km, kc = await start_kernel(config, backend)
    # Not there before (in the image, in the venv), and no network to fetch it from.
    before = await run(kc, f"import {PACKAGE}")
    assert before["error"] == f"ModuleNotFoundError: No module named '{PACKAGE}'", before

    installed = await run(kc, f"%pip install {PACKAGE}", timeout=120)
    assert installed["status"] == "ok", installed
    assert f"Successfully installed {PACKAGE}" in installed["stdout"], installed
    used = await run(kc, f"import {PACKAGE}, os\nprint({PACKAGE}.__file__)\n"
                         f"print({PACKAGE}.tabulate([[1, 2]]))")
    assert used["status"] == "ok", used
    path = used["stdout"].splitlines()[0]
    # In its own HOME (its own filesystem, within its disk limit).
    assert path.startswith(str(km.provisioner.kdir.work) + "/"), used
    assert "-  -" in used["stdout"], used

    # `pip install` without the %: IPython's automagic makes it %pip.
    missing = await run(kc, "pip install lp-no-such-package", timeout=120)
    assert ("lp-no-such-package is not in this sandbox's wheelhouse "
            f"({wheelhouse}); the kernel has no network. Ask the operator to add it: "
            "limited-provisioner wheelhouse add lp-no-such-package") in missing["stderr"], missing

    # An sdist in the wheelhouse is never built: its setup.py never runs.
    sdist = await run(kc, f"%pip install {SDIST_ONLY}\n"
                          "import os; print('built:', os.path.exists(os.path.expanduser('~/BUILT')))",
                      timeout=120)
    assert f"{SDIST_ONLY} is only a source distribution" in sdist["stderr"], sdist
    assert "built: False" in sdist["stdout"], sdist

    # `!pip`: the pip command on PATH (the venv's), or, where the interpreter has none
    # (the kernel image), the way to pip.
    shell = await run(kc, f"!pip install {PACKAGE}", timeout=120)
    if "docker" in backend:
        assert f"use %pip install {PACKAGE}" in shell["stderr"], shell
    else:
        assert "Requirement already satisfied" in shell["stdout"] or (
            "already exists" in shell["stdout"]), shell


async def test_world_writable_wheelhouse_refused(own_state, start_kernel):
    where = tempfile.mkdtemp(prefix="lp-wheelhouse-", dir="/var/lib")
    try:
        os.chmod(where, 0o777)
        with pytest.raises(LimitConfigError, match="writable by every user"):
            await start_kernel({"wheelhouse": where})
    finally:
        shutil.rmtree(where, ignore_errors=True)


async def test_a_wheelhouse_behind_a_dir_kernels_cannot_enter(own_state, start_kernel, wheelhouse):
    """A wheelhouse in root's 0700 dir: the process backend exposes it read-only, as it
    does the interpreter's dirs (sandbox.exposures)."""
    if os.geteuid() != 0:
        pytest.skip("kernels run as the server's own uid: nothing to expose")
    closed = Path(tempfile.mkdtemp(prefix="lp-closed-", dir="/var/lib"))
    try:
        shutil.copytree(wheelhouse, closed / "wheels")
        (closed / "wheels").chmod(0o755)
        closed.chmod(0o700)
        _, kc = await start_kernel({"network": False, "mem_limit": "512M",
                                    "wheelhouse": str(closed / "wheels")})
        installed = await run(kc, f"%pip install {PACKAGE}\nimport {PACKAGE}\n"
                                  "import os; print('listed:', os.listdir(os.path.dirname("
                                  f"{str(closed / 'wheels')!r})))", timeout=120)
        assert installed["status"] == "ok", installed
        assert f"Successfully installed {PACKAGE}" in installed["stdout"], installed
        # Only the wheelhouse itself was put back, not the rest of the closed dir.
        assert "listed: ['wheels']" in installed["stdout"], installed
        written = await run(kc, f"open({str(closed / 'wheels' / 'x.whl')!r}, 'w')")
        assert "Read-only file system" in written["error"] or (
            "Permission denied" in written["error"]), written
    finally:
        shutil.rmtree(closed, ignore_errors=True)


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_agent_backend_kernels_install_from_the_wheelhouse(backend, tmp_path, wheelhouse):
    """examples/agent_backend with AGENT_BACKEND_WHEELHOUSE: a model's `pip install`."""
    state = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))
    service = AgentBackendService(
        state, "test-wh-" + uuid.uuid4().hex[:8], tmp_path,
        {"BACKEND": "docker" if "docker" in backend else "process", "MEM_LIMIT": "512M",
         "NETWORK": "false", "EXEC_TIMEOUT": "120", "WHEELHOUSE": wheelhouse},
    )
    try:
        service.start()
        installed = service.run("wh-user", "s1", f"pip install {PACKAGE}")
        assert installed["status"] == "ok", installed
        used = service.run("wh-user", "s1", f"import {PACKAGE}\nprint({PACKAGE}.__name__)")
        assert used["status"] == "ok" and used["stdout"] == f"{PACKAGE}\n", used
        missing = service.run("wh-user", "s1", "pip install lp-no-such-package")
        assert "lp-no-such-package is not in this sandbox's wheelhouse" in missing["text"], (
            missing)
    except BaseException:
        print(service.logs(8000))
        raise
    finally:
        service.close()
        remove_all_kernels(state)
        shutil.rmtree(state, ignore_errors=True)
