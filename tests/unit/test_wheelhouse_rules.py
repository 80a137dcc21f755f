"""The wheelhouse (wheelhouse.py) without kernels: the setting, the checks, the pip env,
the docker mount, the process exposure, and the kernel hook's part in an InteractiveShell."""

from __future__ import annotations

import ast
import os
import sys

import pytest

from limited_provisioner.docker.container import create_kwargs
from limited_provisioner.errors import LimitConfigError, SandboxStartError
from limited_provisioner.pip_hook import WHEELHOUSE_ENV
from limited_provisioner.pip_hook import hook_source as pip_hook_source
from limited_provisioner.process.interpreter import Needed
from limited_provisioner.process.sandbox import exposures
from limited_provisioner.settings import LimitedSettings
from limited_provisioner.wheelhouse import (
    check_wheelhouse,
    download_command,
    list_wheelhouse,
    parse_filename,
    pip_env,
    target_dir,
    validate_setting,
)

from .test_container_settings import KERNEL_MOUNTS, make_spec, mounts_of
from .test_kernel_hook import Stream, exec_file, own_streams, shell  # noqa: F401

# `!pip` is what the tests are about (IPython suggests %pip).
pytestmark = pytest.mark.filterwarnings("ignore:You executed the system command")


def test_the_setting_is_an_absolute_directory_or_nothing():
    assert validate_setting("") == ""
    assert validate_setting(" /srv/wheels/ ") == "/srv/wheels"
    with pytest.raises(LimitConfigError, match="not a URL"):
        validate_setting("http://127.0.0.1:8080/simple")
    with pytest.raises(LimitConfigError, match="absolute"):
        validate_setting("wheels")
    assert LimitedSettings(wheelhouse="/srv/wheels/").wheelhouse == "/srv/wheels"
    with pytest.raises(LimitConfigError):
        LimitedSettings(wheelhouse="https://pypi.org/simple")


@pytest.mark.parametrize(("mode", "error"), [
    (0o755, None),
    (0o775, None),
    (0o777, "writable by every user"),
    (0o750, "not readable by other users"),
    (0o701, "not readable by other users"),
])
def test_check_wheelhouse_modes(tmp_path, mode, error):
    where = tmp_path / "wheels"
    where.mkdir()
    where.chmod(mode)
    if error is None:
        check_wheelhouse(str(where))
    else:
        with pytest.raises(LimitConfigError, match=error):
            check_wheelhouse(str(where))


def test_a_wheelhouse_a_kernel_uid_owns_is_refused(tmp_path):
    where = tmp_path / "wheels"
    where.mkdir(mode=0o755)
    st = os.stat(where)
    with pytest.raises(LimitConfigError, match="belongs to kernel uid"):
        check_wheelhouse(str(where), (st.st_uid, st.st_uid))
    check_wheelhouse(str(where), (st.st_uid + 1, st.st_uid + 10))


def test_a_missing_wheelhouse_or_a_file_is_refused(tmp_path):
    with pytest.raises(LimitConfigError, match="cannot be used"):
        check_wheelhouse(str(tmp_path / "nope"))
    (tmp_path / "f").write_text("")
    with pytest.raises(LimitConfigError, match="not a directory"):
        check_wheelhouse(str(tmp_path / "f"))


def test_pip_env_without_network_is_the_wheelhouse_only_and_wheels_only():
    env = pip_env("/srv/wheels", "/k/x/work")
    assert env == {
        WHEELHOUSE_ENV: "/srv/wheels",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": "/srv/wheels",
        "PIP_ONLY_BINARY": ":all:",
        "PIP_TARGET": target_dir("/k/x/work"),
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    assert env["PIP_TARGET"].startswith("/k/x/work/")
    # With network, the index too; still wheels only.
    networked = pip_env("/srv/wheels", "/k/x/work", network=True)
    assert "PIP_NO_INDEX" not in networked
    assert networked["PIP_ONLY_BINARY"] == ":all:"


@pytest.mark.parametrize(("name", "expect"), [
    ("tabulate-0.9.0-py3-none-any.whl", ("tabulate", "0.9.0", "wheel")),
    ("Foo_Bar-1.0-1-cp311-cp311-manylinux_2_17_x86_64.whl", ("foo-bar", "1.0", "wheel")),
    ("lpsdistonly-1.0.tar.gz", ("lpsdistonly", "1.0", "sdist")),
    ("my-pkg-2.0.zip", ("my-pkg", "2.0", "sdist")),
    ("README", None),
])
def test_parse_filename(name, expect):
    dist = parse_filename(name)
    assert (dist and (dist.name, dist.version, dist.kind)) == expect


def test_list_wheelhouse_sorted_by_name(tmp_path):
    for name in ("b-1.0-py3-none-any.whl", "a-2.0.tar.gz", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [d.file for d in list_wheelhouse(str(tmp_path))] == [
        "a-2.0.tar.gz", "b-1.0-py3-none-any.whl",
    ]


def test_download_command_is_binary_only_and_brings_pip():
    cmd = download_command(["pandas<3"], "/srv/wheels", python="/usr/bin/python3",
                           python_version="3.11", platforms=["manylinux2014_x86_64"])
    assert cmd == [
        "/usr/bin/python3", "-m", "pip", "download", "--only-binary=:all:", "--dest",
        "/srv/wheels", "--python-version", "3.11", "--platform", "manylinux2014_x86_64",
        "pandas<3", "pip",
    ]


def test_docker_binds_the_wheelhouse_read_only_at_its_own_path():
    kwargs = create_kwargs(make_spec(wheelhouse="/srv/wheels"))
    assert mounts_of(kwargs) == [*KERNEL_MOUNTS, ("/srv/wheels", "/srv/wheels", "bind", True)]
    assert mounts_of(create_kwargs(make_spec())) == KERNEL_MOUNTS


@pytest.mark.skipif(os.geteuid() != 0, reason="modes do not stop root's own checks")
def test_a_wheelhouse_behind_a_closed_dir_is_exposed(tmp_path):
    closed = tmp_path / "closed"
    (closed / "wheels").mkdir(parents=True)
    closed.chmod(0o700)
    (closed / "wheels").chmod(0o755)
    expose, notes = exposures([Needed(str(closed / "wheels"), required=True)])
    assert list(expose) == [str(closed / "wheels")], (expose, notes)
    (closed / "wheels").chmod(0o777)
    with pytest.raises(SandboxStartError, match="writable by every user"):
        exposures([Needed(str(closed / "wheels"), required=True)])


# -- the kernel's side (kernel_hook.use_wheelhouse) ----------------------------------------


@pytest.fixture
def pip_hook_file(tmp_path):
    """pip's hook as the provisioner writes it into the kernel dir."""
    path = tmp_path / "pip_hook.py"
    path.write_text(pip_hook_source())
    return path


@pytest.fixture
def wheel_hook(shell, pip_hook_file, monkeypatch, tmp_path):  # noqa: F811
    """pip's hook installed with a wheelhouse holding a wheel and an sdist; ``pip`` on
    PATH is a script that fails (what pip does for a package it does not find)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "tabulate-0.9.0-py3-none-any.whl").write_text("")
    (wheels / "lpsdistonly-1.0.tar.gz").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "pip").chmod(0o755)
    target = tmp_path / "home" / ".local" / "wheelhouse-packages"
    own_streams(monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("PYTHONPATH", "/earlier")
    for name, value in pip_env(str(wheels), str(tmp_path / "home")).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(shell, "system", shell.system_raw)  # its output on our streams
    before = dict(shell.user_ns)
    exec_file(shell, pip_hook_file)
    assert sorted(set(shell.user_ns) ^ set(before)) == []  # the namespace given back
    shell.wheels, shell.target = str(wheels), str(target)
    return shell


def _stderr_of(shell, code):  # noqa: F811
    """What running the cell ``code`` printed to sys.stderr (pytest's capture is back
    between a fixture's setup and the test: the stream is swapped here)."""
    saved, sys.stderr = sys.stderr, Stream()
    try:
        shell.run_cell(code)
        return sys.stderr.getvalue()
    finally:
        sys.stderr = saved


def test_the_target_dir_is_made_and_importable_now_and_in_subprocesses(wheel_hook):
    assert os.path.isdir(wheel_hook.target)
    assert sys.path[0] == wheel_hook.target
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == wheel_hook.target
    assert os.environ["PYTHONPATH"].endswith("/earlier")
    # A module pip puts there later is found without a restart.
    with open(os.path.join(wheel_hook.target, "lp_late_module.py"), "w") as f:
        f.write("VALUE = 7\n")
    wheel_hook.run_cell("import lp_late_module; value = lp_late_module.VALUE")
    sys.modules.pop("lp_late_module", None)
    assert wheel_hook.user_ns["value"] == 7


@pytest.mark.parametrize(("cell", "expect"), [
    ("!pip install lp-missing==1.0", (
        "lp-missing is not in this sandbox's wheelhouse ({w}); the kernel has no network. "
        "Ask the operator to add it: limited-provisioner wheelhouse add lp-missing")),
    ("!pip install -q --no-deps lpsdistonly", "lpsdistonly is only a source distribution"),
    ("!pip install tabulate",
     "pip could not install tabulate from this sandbox's wheelhouse ({w}): a dependency"),
    ("!pip install -r req.txt lp-other", "lp-other is not in"),
])
def test_a_failed_install_names_what_the_wheelhouse_lacks(wheel_hook, cell, expect):
    said = _stderr_of(wheel_hook, cell)
    assert expect.format(w=wheel_hook.wheels) in said, said
    assert "req.txt" not in said


def test_a_successful_or_unrelated_command_says_nothing(wheel_hook, tmp_path):
    ok = tmp_path / "okbin"
    ok.mkdir()
    (ok / "pip").write_text("#!/bin/sh\nexit 0\n")
    (ok / "pip").chmod(0o755)
    assert _stderr_of(wheel_hook, "!false") == ""
    os.environ["PATH"] = f"{ok}:/usr/bin:/bin"
    assert _stderr_of(wheel_hook, "!pip install lp-missing") == ""


def test_no_pip_command_points_at_the_magic(wheel_hook):
    os.environ["PATH"] = "/nonexistent"
    said = _stderr_of(wheel_hook, "!pip install tabulate")
    assert "there is no pip command here: use %pip install tabulate" in said, said


def test_without_a_wheelhouse_the_hook_does_nothing(shell, pip_hook_file, monkeypatch):  # noqa: F811
    monkeypatch.delenv(WHEELHOUSE_ENV, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    path, system, before = list(sys.path), shell.system, dict(shell.user_ns)
    exec_file(shell, pip_hook_file)
    assert (sys.path, shell.system, shell.user_ns) == (path, system, before)
    assert not shell.events.callbacks["post_run_cell"]


def test_pip_hook_source_is_a_stdlib_only_python_3_8_module():
    source = pip_hook_source()
    tree = ast.parse(source, feature_version=(3, 8))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= set(sys.stdlib_module_names), imported
    assert len(source.splitlines()) <= 200


def test_pip_runs_with_its_temp_dir_on_the_kernels_disk(wheel_hook, tmp_path, monkeypatch):
    """pip's whole install goes through a temp dir: not the tmpfs /tmp (memory)."""
    monkeypatch.setenv("TMPDIR", "/tmp")
    report = tmp_path / "bin" / "pip"
    report.write_text(f"#!/bin/sh\necho \"$TMPDIR\" > {tmp_path}/seen\n")
    _stderr_of(wheel_hook, "!pip install tabulate")
    scratch = os.path.join(os.path.dirname(wheel_hook.target), "pip-tmp")
    assert (tmp_path / "seen").read_text().strip() == scratch
    assert os.path.isdir(scratch)
    assert os.environ["TMPDIR"] == "/tmp"  # given back after the cell
    wheel_hook.run_cell("x = 1")
    assert os.environ["TMPDIR"] == "/tmp"
