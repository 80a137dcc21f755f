"""What a kernel's interpreter needs (interpreter.interpreter_paths) and which of it the
sandbox exposes (sandbox.exposures), on fake install trees; no kernel is started."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from limited_provisioner import SandboxStartError
from limited_provisioner.process.interpreter import Needed, interpreter_paths
from limited_provisioner.process.launch_status import LaunchStatus
from limited_provisioner.process.sandbox import exposures

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="makes dirs in /var/lib, chowns")

@pytest.fixture
def tree(request):
    """``tree(under, mode)``: a fresh dir (removed afterwards)."""
    made: list[Path] = []

    def _make(under: str = "/var/tmp", mode: int = 0o755) -> Path:
        path = Path(tempfile.mkdtemp(prefix="lp-unit-", dir=under))
        os.chmod(path, mode)
        made.append(path)
        return path

    yield _make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def fake_python(prefix: Path, target: Path | None = None) -> Path:
    """``<prefix>/bin/python``: a link to ``target``, else an executable file."""
    (prefix / "bin").mkdir(parents=True)
    python = prefix / "bin" / "python"
    if target is not None:
        python.symlink_to(target)
    else:
        python.write_text("#!/bin/sh\n")
        python.chmod(0o755)
    return python


def site_packages(prefix: Path) -> Path:
    site = prefix / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    return site


def paths(needed: list[Needed]) -> set[str]:
    return {n.path for n in needed}


def test_a_venv_needs_its_prefix_and_its_base(tree):
    root = tree()
    base_python = fake_python(root / "base")
    venv = root / "venv"
    python = fake_python(venv, base_python)
    (venv / "pyvenv.cfg").write_text(f"home = {root / 'base' / 'bin'}\nversion = 3.11\n")
    found = paths(interpreter_paths([str(python), "-m", "ipykernel_launcher"], {}))
    assert {str(venv), str(venv / "bin"), str(root / "base"), str(root / "base" / "bin")} <= found


def test_a_conda_env_is_a_prefix(tree):
    env = tree() / "env"
    python = fake_python(env)
    (env / "conda-meta").mkdir()
    found = interpreter_paths([str(python)], {})
    assert Needed(str(env), required=True) in found


def test_pth_lines_editable_finders_and_pythonpath(tree):
    root = tree()
    venv = root / "venv"
    python = fake_python(venv)
    site = site_packages(venv)
    src, mapped, extra = root / "src", root / "mapped" / "pkg", root / "extra"
    for d in (src, mapped, extra):
        d.mkdir(parents=True)
    (site / "plain.pth").write_text(f"# a comment\n{src}\nimport os\n../../../../missing\n")
    (site / "__editable__.pkg-1.0.pth").write_text(
        "import __editable___pkg_1_0_finder; __editable___pkg_1_0_finder.install()\n"
    )
    (site / "__editable___pkg_1_0_finder.py").write_text(
        f"import sys\nMAPPING: dict[str, str] = {{'pkg': {str(mapped)!r}}}\nNAMESPACES = {{}}\n"
    )
    found = paths(interpreter_paths([str(python)], {"PYTHONPATH": f"{extra}::relative"}))
    assert {str(src), str(mapped), str(extra)} <= found
    assert not any("missing" in p or p.endswith("relative") for p in found)


def test_wrapped_commands_and_the_servers_own_interpreter(tree):
    python = fake_python(tree() / "env")
    found = interpreter_paths(["/bin/sh", "-c", 'exec "$@"', "sh", str(python)], {})
    assert Needed(str(python.parent), required=True) in found
    server = os.path.dirname(os.path.realpath(sys.executable))
    (entry,) = [n for n in found if n.path == server]
    # Exposed if it can be, required only where a needed program lives in the same dir
    # (a Debian python3 in /usr/bin, like the wrapper's /bin/sh on a merged-/usr host).
    needed_dirs = {os.path.dirname(os.path.realpath(p)) for p in ("/bin/sh", str(python))}
    assert entry.required == (server in needed_dirs)


def test_a_venv_under_a_scratch_dir_is_exposed_there(tree):
    venv = tree("/var/tmp") / "venv"
    python = fake_python(venv)
    expose, notes = exposures(interpreter_paths([str(python)], {"PYTHONPATH": "/var/tmp"}))
    assert expose[str(venv)] == "/var/tmp"
    assert str(venv / "bin") not in expose  # inside the exposed tree
    assert "/var/tmp" not in expose
    assert any("/var/tmp is not exposed" in n for n in notes)


@needs_root
def test_behind_a_0700_dir_the_top_is_that_dir_or_the_scratch_dir(tree):
    outside = tree("/var/lib", 0o700)
    inside = tree("/var/tmp", 0o700)
    expose, _ = exposures([Needed(str(fake_python(outside / "venv").parent.parent), required=True),
                           Needed(str(fake_python(inside / "venv").parent.parent), required=True)])
    assert expose == {str(outside / "venv"): str(outside), str(inside / "venv"): "/var/tmp"}


def test_a_required_path_other_users_cannot_read_is_a_clear_error(tree):
    venv = tree("/var/tmp") / "venv"
    fake_python(venv)
    venv.chmod(0o700)
    with pytest.raises(SandboxStartError, match=rf"{venv} is not readable by other users.*chmod"):
        exposures([Needed(str(venv), required=True)])
    expose, notes = exposures([Needed(str(venv))])  # a sys.path entry: left out, said why
    assert expose == {} and "not readable" in notes[0]


def test_a_dir_every_user_may_write_to_is_not_exposed(tree):
    shared = tree("/var/tmp") / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    expose, notes = exposures([Needed(str(shared))])
    assert expose == {} and "writable by every user" in notes[0]
    with pytest.raises(SandboxStartError, match="chmod o-w"):
        exposures([Needed(str(shared), required=True)])


@needs_root
def test_a_pth_of_another_user_opens_no_dir_it_could_not_enter(tree):
    locked = tree("/var/lib", 0o700)  # root's
    (locked / "secret").mkdir()
    named_by_other = Needed(str(locked / "secret"), named_by=12345)
    expose, notes = exposures([named_by_other])
    assert expose == {} and "uid 12345" in notes[0]
    # Under a dir of its own that user could have opened anyway: exposed.
    os.chown(locked, 12345, 12345)
    expose, _ = exposures([named_by_other])
    assert expose == {str(locked / "secret"): str(locked)}


def test_paths_the_kernel_sees_anyway_are_not_exposed():
    assert exposures([Needed("/usr", required=True), Needed("/etc")]) == ({}, [])


# -- the launcher's status pipe ---------------------------------------------------------


async def test_status_eof_means_started_and_a_message_means_failed():
    ok = LaunchStatus()
    ok.launched()  # nobody else holds the write end: EOF at once, as after the exec
    assert await ok.failure(timeout=5) is None
    ok.close()

    failed = LaunchStatus()
    os.write(failed.write_fd, b"x" * 10_000)  # more than a message may be
    failed.launched()
    said = await failed.failure(timeout=5)
    failed.close()
    assert said is not None and len(said) == 4096


async def test_a_silent_launcher_times_out_without_blocking_the_loop():
    stuck = LaunchStatus()  # the write end stays open: no EOF, no message
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    said = await stuck.failure(timeout=0.3)
    ticker.cancel()
    stuck.close()
    assert said is not None and "did not finish setting up" in said
    assert ticks >= 10
