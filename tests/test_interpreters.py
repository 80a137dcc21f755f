"""Process kernels whose interpreter lives where the sandbox hides it: real kernels.

The sandbox gives every kernel a private /tmp (and /var/tmp, /dev/shm) and runs it as a
uid that cannot pass a 0700 dir. A venv, a PYTHONPATH entry or an editable install
there is exposed read-only (sandbox.exposures, launch.py); these tests start kernels
from such places and check what the kernel sees and cannot change.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from limited_provisioner import SandboxStartError

from .conftest import run

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the private /tmp and the kernel's own uid need root"
)

WRITE = (
    "import errno, os\n"
    "def write(path):\n"
    "    try:\n"
    "        open(path, 'w').write('from the kernel'); return 'ok'\n"
    "    except OSError as e:\n"
    "        return errno.errorcode.get(e.errno, str(e.errno))\n"
)


def make_venv(parent: Path) -> Path:
    """A venv in ``parent`` that can run ipykernel: its site-packages lists this
    interpreter's through a ``.pth`` file (as a ``--system-site-packages`` venv of a venv
    would need), so no package is installed."""
    venv = parent / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site_dir,) = venv.glob("lib/python*/site-packages")
    (site_dir / "lp_parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


@pytest.fixture
def scratch(request):
    """``scratch(under, mode)``: a fresh dir in ``under`` (removed afterwards)."""
    made: list[Path] = []

    def _make(under: str = "/tmp", mode: int = 0o755) -> Path:
        path = Path(tempfile.mkdtemp(prefix="lp-interp-", dir=under))
        os.chmod(path, mode)
        made.append(path)
        return path

    yield _make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def argv(python: Path | str) -> list[str]:
    return [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]


async def start_with(start_kernel, python, env=None):
    """A limited kernel whose kernelspec runs ``python`` (and sets ``env``)."""
    return await start_kernel({}, argv=argv(python), env=env)


async def test_venv_under_tmp_runs_as_that_venv(start_kernel, scratch):
    venv = make_venv(scratch("/tmp"))
    _, kc = await start_with(start_kernel, venv / "bin" / "python")
    out = await run(kc, WRITE + (
        "import sys, ipykernel\n"
        "print(sys.prefix)\n"
        f"print(write({str(venv / 'planted')!r}))\n"
        f"print(write({str(venv / 'bin' / 'python')!r}))\n"
        "print(os.getuid())\n"
    ))
    prefix, planted, python, uid = out["stdout"].split()
    assert prefix == str(venv), out
    assert planted == "EROFS" and python == "EROFS"
    assert int(uid) != 0
    assert not (venv / "planted").exists()


async def test_pythonpath_entry_under_tmp_is_importable(start_kernel, scratch):
    lib = scratch("/tmp") / "lib"
    lib.mkdir(mode=0o755)
    (lib / "lp_probe_module.py").write_text("VALUE = 42\n")
    (lib.parent / "beside").write_text("host only")
    _, kc = await start_with(start_kernel, sys.executable, env={"PYTHONPATH": str(lib)})
    out = await run(kc, WRITE + (
        "import lp_probe_module\n"
        "print(lp_probe_module.VALUE)\n"
        f"print(write({str(lib / 'lp_probe_module.py')!r}))\n"
        f"print(os.path.exists({str(lib.parent / 'beside')!r}))\n"
    ))
    assert out["stdout"].split() == ["42", "EROFS", "False"], out
    assert (lib / "lp_probe_module.py").read_text() == "VALUE = 42\n"


async def test_editable_install_under_tmp_is_importable(start_kernel, scratch):
    """A project in /tmp/src installed into a venv elsewhere: a .pth names it."""
    src = scratch("/tmp") / "src"
    (src / "lp_editable_probe").mkdir(parents=True)
    (src / "lp_editable_probe" / "__init__.py").write_text("WHERE = __file__\n")
    venv = make_venv(scratch("/var/lib"))
    (site_dir,) = venv.glob("lib/python*/site-packages")
    (site_dir / "__editable__.lp_editable_probe-0.1.pth").write_text(f"{src}\n")
    _, kc = await start_with(start_kernel, venv / "bin" / "python")
    out = await run(kc, "import lp_editable_probe; print(lp_editable_probe.WHERE)")
    assert out["stdout"].strip() == str(src / "lp_editable_probe" / "__init__.py"), out


@pytest.mark.parametrize("under", ["/tmp", "/var/lib"])
async def test_venv_behind_a_0700_dir(start_kernel, scratch, under):
    # mkdtemp's 0700: the kernel's uid could not pass it even without a private /tmp.
    locked = scratch(under, 0o700)
    venv = make_venv(locked)
    (locked / "secret").write_text("root only")
    _, kc = await start_with(start_kernel, venv / "bin" / "python")
    out = await run(kc, WRITE + (
        "import sys\n"
        "print(sys.prefix)\n"
        f"print(sorted(os.listdir({str(locked)!r})))\n"
        f"print(write({str(locked / 'planted')!r}))\n"
        f"print(write({str(venv / 'planted')!r}))\n"
    ))
    prefix, listing, locked_write, venv_write = out["stdout"].splitlines()
    assert prefix == str(venv), out
    assert listing == "['venv']"  # nothing else of the 0700 dir
    assert locked_write in ("EACCES", "EROFS") and venv_write == "EROFS"
    assert sorted(p.name for p in locked.iterdir()) == ["secret", "venv"]


async def test_a_venv_without_ipykernel_fails_its_start_saying_so(start_kernel, scratch):
    """The interpreter runs in the sandbox but finds no ipykernel: the start raises with
    the kernel's own last words instead of returning a kernel that dies at once."""
    venv = scratch("/tmp") / "bare"
    base = getattr(sys, "_base_executable", sys.executable)
    await asyncio.to_thread(
        subprocess.run, [base, "-m", "venv", "--without-pip", str(venv)], check=True
    )
    with pytest.raises(SandboxStartError) as raised:
        await start_with(start_kernel, venv / "bin" / "python")
    assert "exited during its start" in raised.value.reason
    assert "No module named ipykernel_launcher" in raised.value.reason
