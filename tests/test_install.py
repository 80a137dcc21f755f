"""`pip install` of this checkout, editable or not, into a fresh venv: the server extension
is enabled afterwards (its jupyter_server_config.d file is placed by the wheel's shared-data,
which hatchling also puts into editable wheels), and stays enabled after a second install.

The venv is made without pip or dependencies (~0.1 s): a ``.pth`` file puts the site-packages
of the interpreter running the tests after its own, so it finds pip, jupyter_server and our
dependencies there, while ``sys.prefix`` — where pip installs and where jupyter looks for
``etc/jupyter`` — is the new venv's. pip leaves this environment's own install alone
("outside environment"). Each install takes ~2-4 s (hatchling from pip's cache).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG_NAME = "jupyter_server_config.d/limited_provisioner.json"

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_venv():
    """A venv under /var/tmp that sees this interpreter's packages after its own; removed
    afterwards."""
    root = Path(tempfile.mkdtemp(prefix="lp-install-", dir="/var/tmp"))
    try:
        venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
        python = root / "bin" / "python"
        own = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
        # After the venv's own site-packages, and after its editable-install .pth files
        # ('_' sorts before 'z'): what it installs wins.
        Path(own, "zzz_test_parent_env.pth").write_text("\n".join(sorted(ours)) + "\n")
        yield python
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _pip_install(python: Path, *args: str) -> None:
    result = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", *args],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _extension_status(python: Path, tmp_path: Path) -> list[str]:
    """The lines of ``jupyter server extension list`` under the venv's own config dir."""
    prefix = Path(python).parent.parent
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "no-user-config")}
    env.pop("JUPYTER_CONFIG_PATH", None)
    result = subprocess.run(
        [python, "-m", "jupyter_server", "extension", "list"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )
    assert result.returncode == 0, result.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    section = text.split(f"Config dir: {prefix}/etc/jupyter", 1)
    assert len(section) == 2, text
    return section[1].split("Config dir:", 1)[0].splitlines()


def _assert_enabled(python: Path, tmp_path: Path) -> None:
    prefix = Path(python).parent.parent
    assert (prefix / "etc" / "jupyter" / CONFIG_NAME).is_file()
    lines = [x.strip() for x in _extension_status(python, tmp_path)]
    assert "limited_provisioner enabled" in lines, lines
    assert any(re.fullmatch(r"limited_provisioner \S+ OK", x) for x in lines), lines


def _tree_top() -> set[str]:
    return {p.name for p in REPO.iterdir()}


def test_editable_install_enables_the_server_extension_and_a_second_keeps_it(
    fresh_venv, tmp_path
):
    before = _tree_top()
    _pip_install(fresh_venv, "-e", str(REPO))
    _assert_enabled(fresh_venv, tmp_path)
    code = "import limited_provisioner; print(limited_provisioner.__file__)"
    where = subprocess.run([fresh_venv, "-c", code], capture_output=True, text=True,
                           check=True, cwd=tmp_path)
    assert where.stdout.strip() == str(REPO / "limited_provisioner" / "__init__.py")
    # Reinstalling uninstalls the first install's files, the config among them, then
    # installs again: still there.
    _pip_install(fresh_venv, "-e", str(REPO))
    _assert_enabled(fresh_venv, tmp_path)
    # No build debris (setuptools' build/, *.egg-info) in the checkout.
    assert _tree_top() <= before | {".pytest_cache"}


def test_install_enables_the_server_extension(fresh_venv, tmp_path):
    before = _tree_top()
    _pip_install(fresh_venv, str(REPO))
    _assert_enabled(fresh_venv, tmp_path)
    prefix = Path(fresh_venv).parent.parent
    code = (
        "import limited_provisioner, pathlib; "
        "p = pathlib.Path(limited_provisioner.__file__).parent; "
        "print(p); print((p / 'docker' / 'image' / 'Dockerfile').is_file())"
    )
    where = subprocess.run([fresh_venv, "-c", code], capture_output=True, text=True,
                           check=True, cwd=tmp_path)
    package, dockerfile = where.stdout.split()
    assert Path(package).is_relative_to(prefix) and dockerfile == "True"
    assert _tree_top() <= before | {".pytest_cache"}


def test_wheel_holds_the_server_config_package_data_and_entry_points(tmp_path):
    """What `pip install` places: the config that enables the server extension (re-adoption,
    429s) into {prefix}/etc/jupyter/jupyter_server_config.d/, the kernel image's files,
    the provisioners' entry points and the command."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("limited_provisioner-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    config = [n for n in names if n.endswith("data/data/etc/jupyter/" + CONFIG_NAME)]
    assert config, names
    data = json.loads(archive.read(config[0]))
    assert data["ServerApp"]["jpserver_extensions"]["limited_provisioner"] is True
    for name in ("docker/image/Dockerfile", "docker/image/requirements.txt"):
        assert "limited_provisioner/" + name in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = archive.read(entry_points).decode()
    assert "limited-provisioner = limited_provisioner.cli:main" in text
    assert "limited-process-provisioner = limited_provisioner.process:" in text
    assert "limited-docker-provisioner = limited_provisioner.docker:" in text
    # A prebuilt JupyterLab extension, where the checkout has one, goes where JupyterLab
    # finds it.
    lab = REPO / "limited_provisioner" / "labextension" / "package.json"
    if lab.is_file():
        target = "data/data/share/jupyter/labextensions/limited-provisioner/package.json"
        assert any(n.endswith(target) for n in names), names
