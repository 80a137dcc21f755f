"""A notebook's kernel works in the notebook's folder (workspace.py), on both backends.

Real kernels started as jupyter_server starts them (``cwd`` = the notebook's folder) in
a folder owned by a user (uid 1000), as root: the kernel runs as its own uid and still
reads and writes there as that user, through an idmapped mount; what it makes is
owned by the folder's owner, stays after shutdown, and is never set-id. Everything is
removed afterwards, kernels by the fixture, folders here.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from jupyter_client import AsyncKernelManager

from limited_provisioner.workspace import MOUNTS_DIR, WorkspaceError

from .conftest import NOTHING_LEFT, backends, run
from .harness import kernel_leftovers, kill_kernel_leftovers, write_kernelspec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="per-kernel uids need root")

USER = 1000
OTHER_USER = 1001


@pytest.fixture
def folders():
    """``make(owner)`` -> a fresh folder under /var/lib owned by ``owner`` (0755)."""
    made: list[Path] = []

    def make(owner: int = USER, name: str = "nb") -> Path:
        top = Path(tempfile.mkdtemp(prefix="lp-ws-", dir="/var/lib"))
        top.chmod(0o755)
        made.append(top)
        folder = top / name
        folder.mkdir(mode=0o755)
        os.chown(folder, owner, owner)
        return folder

    yield make
    for top in made:
        shutil.rmtree(top, ignore_errors=True)


def _result(out: dict) -> dict:
    assert out["error"] is None, out
    line = [x for x in out["stdout"].splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_a_notebook_kernel_reads_and_writes_its_folder_as_the_folders_owner(
    start_kernel, backend, folders, own_state
):
    folder = folders()
    (folder / "data.csv").write_text("x,y\n1,2\n")
    os.chown(folder / "data.csv", USER, USER)
    km, kc = await start_kernel({"mem_limit": "512M"}, backend,
                                start_kwargs={"cwd": str(folder)})
    out = _result(await run(kc, (
        "import os, json\n"
        "data = open('data.csv').read()\n"
        "open('result.csv', 'w').write(data.upper())\n"
        "os.makedirs('out/deeper', exist_ok=True)\n"
        "open('out/deeper/f.txt', 'w').write('f')\n"
        "print('RESULT ' + json.dumps({'cwd': os.getcwd(), 'uid': os.getuid(),"
        " 'home': os.environ['HOME'], 'data': data,"
        " 'owner': os.stat('result.csv').st_uid}))\n"
    )))
    assert out["cwd"] == str(folder) and out["data"] == "x,y\n1,2\n"
    # Its own uid, neither root nor the folder's owner; in its own view the files it
    # made are its own.
    assert out["uid"] not in (0, USER) and out["owner"] == out["uid"]
    assert out["home"] != str(folder)  # HOME stays its private dir
    assert "idmapped" in km.provisioner.enforcement["workspace"]
    # jupyter_server's resolvePath: the file next to the notebook, on either backend.
    assert km.resolve_path("data.csv") == str(folder / "data.csv")
    assert km.resolve_path("../nb/data.csv") is None
    kernel_id = km.kernel_id
    await km.shutdown_kernel(now=True)
    # Still there after shutdown, owned as the user expects.
    for made in ("result.csv", "out", "out/deeper", "out/deeper/f.txt"):
        st = os.stat(folder / made)
        assert (st.st_uid, st.st_gid) == (USER, USER), made
    assert (folder / "result.csv").read_text() == "X,Y\n1,2\n"
    assert not (own_state / MOUNTS_DIR / kernel_id).exists()
    assert kernel_leftovers(own_state, [kernel_id]) == NOTHING_LEFT


PROBES = """
import os, stat, json
def attempt(what, fn):
    try:
        fn()
        return what + ': done'
    except OSError as e:
        return what + ': ' + type(e).__name__
said = [
    attempt('chmod setuid', lambda: os.chmod('mine', 0o4755)),
    attempt('chmod setgid', lambda: os.chmod('mine', 0o2755)),
    attempt('create setuid', lambda: os.close(os.open('suid', os.O_CREAT | os.O_WRONLY, 0o4755))),
    attempt('mknod setuid', lambda: os.mknod('node', stat.S_IFREG | 0o4755)),
    attempt('write root file', lambda: open('roots.txt', 'a').write('x')),
    attempt('write other user file', lambda: open('others.txt', 'a').write('x')),
    attempt('write sibling folder', lambda: open('../sibling/planted', 'w').write('x')),
    attempt('plain chmod', lambda: os.chmod('mine', 0o600)),
]
print('RESULT ' + json.dumps(said))
"""


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_nothing_a_kernel_makes_in_its_folder_is_more_privileged_than_the_kernel(
    start_kernel, backend, folders
):
    """No set-id file (it would run as the folder's owner for anyone on the host), no
    write to files of root or of another user there, nothing outside the folder."""
    folder = folders()
    sibling = folder.parent / "sibling"
    sibling.mkdir()
    os.chown(sibling, USER, USER)
    (folder / "mine").write_text("")
    os.chown(folder / "mine", USER, USER)
    for name, owner in (("roots.txt", 0), ("others.txt", OTHER_USER)):
        (folder / name).write_text("")
        os.chown(folder / name, owner, owner)
        (folder / name).chmod(0o644)
    km, kc = await start_kernel({}, backend, start_kwargs={"cwd": str(folder)})
    said = _result(await run(kc, PROBES))
    assert said == [
        "chmod setuid: PermissionError", "chmod setgid: PermissionError",
        "create setuid: PermissionError", "mknod setuid: PermissionError",
        "write root file: PermissionError", "write other user file: PermissionError",
        said[6], "plain chmod: done",
    ]
    # Process: read-only view of the host (OSError EROFS); docker: not in the container.
    assert said[6] in ("write sibling folder: OSError", "write sibling folder: FileNotFoundError")
    await km.shutdown_kernel(now=True)
    for path in folder.rglob("*"):
        assert not path.lstat().st_mode & (stat.S_ISUID | stat.S_ISGID), path
    assert not (folder / "suid").exists() and not (folder / "node").exists()
    assert (folder / "roots.txt").read_text() == (folder / "others.txt").read_text() == ""
    assert list(sibling.iterdir()) == []


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_a_root_owned_folder_is_read_only_and_the_cell_says_why(
    start_kernel, backend, folders
):
    folder = folders(owner=0)
    (folder / "data.csv").write_text("r\n")
    km, kc = await start_kernel({}, backend, start_kwargs={"cwd": str(folder)})
    out = await run(kc, "print(open('data.csv').read()); open('result.csv', 'w')")
    assert out["stdout"].strip() == "r"
    assert "Read-only file system" in out["error"]
    assert f"may read but not write {folder}: it belongs to root" in out["error"]
    assert "chown -R USER" in out["error"]
    assert not (folder / "result.csv").exists()
    assert "read-only" in km.provisioner.enforcement["workspace"]


async def test_a_symlink_a_kernel_planted_never_becomes_the_next_kernels_folder(
    start_kernel, folders, jupyter_path, own_state
):
    """A kernel links ``escape -> /etc`` in its folder; a start "in" that link is refused
    (503 from a server) with the real path, and reserves nothing."""
    folder = folders()
    km, kc = await start_kernel({}, start_kwargs={"cwd": str(folder)})
    out = await run(kc, "import os; os.symlink('/etc', 'escape')")
    assert out["error"] is None, out
    assert os.lstat(folder / "escape").st_uid == USER
    await km.shutdown_kernel(now=True)
    write_kernelspec(jupyter_path, "next", {})
    second = AsyncKernelManager(kernel_name="next")
    try:
        with pytest.raises(WorkspaceError, match=r"symlink .*escape, owned by uid 1000"):
            await second.start_kernel(cwd=str(folder / "escape"))
    finally:
        kill_kernel_leftovers(second.kernel_id)
    assert not second.has_kernel
    assert kernel_leftovers(own_state, [second.kernel_id]) == NOTHING_LEFT


async def test_a_restart_keeps_the_folder_and_a_kernel_without_one_keeps_its_own_dir(
    start_kernel, folders
):
    folder = folders()
    km, kc = await start_kernel({}, start_kwargs={"cwd": str(folder)})
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=60)
    out = await run(kc, "import os; print(os.getcwd())")
    assert out["stdout"].strip() == str(folder)
    # From code, without a folder: the private dir, its HOME.
    _, plain = await start_kernel({})
    out = await run(plain, "import os; print(os.getcwd() == os.environ['HOME'])")
    assert out["stdout"].strip() == "True"
    # workspace="private": even a notebook's kernel gets its own dir.
    _, private = await start_kernel({"workspace": "private"}, start_kwargs={"cwd": str(folder)})
    out = await run(private, "import os; print(os.getcwd() == os.environ['HOME'])")
    assert out["stdout"].strip() == "True"
