"""The kernel's own filesystem (workfs.py) on real kernels, both backends: writes past
disk_limit / files_limit fail with ENOSPC in the kernel, nothing lands over the limit,
the kernel lives on; the filesystem survives a restart and is gone without a trace
(mounts, loop device, image) after a shutdown or a reap.

Needs root, /dev/loop-control and mkfs.ext4 (skipped otherwise: the watchdog fallback is
what tests/test_process.py and tests/test_docker.py check with own_filesystem off).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from limited_provisioner import adopt, workfs
from limited_provisioner.reaper import reap
from limited_provisioner.watchdog import dir_usage

from .conftest import TEST_OWNER, backends, run
from .harness import docker_available, remove_containers_with_label, write_kernelspec
from .test_recovery import recovery_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(
    workfs.unavailable() is not None, reason=f"no own filesystem here: {workfs.unavailable()}"
)

M = 2**20
# Our own owner: other test sessions on this host remove every container of TEST_OWNER
# when they end, which would look like a kernel dying here.
OWNER = f"{TEST_OWNER}-disk"
LIMITS = {"mem_limit": "512M", "disk_limit": "50M", "files_limit": 1000,
          "watchdog_interval": 0.1, "owner": OWNER}


@pytest.fixture(scope="module", autouse=True)
def no_container_left():
    yield
    if docker_available():
        remove_containers_with_label("owner", OWNER)

# Reports what it managed to write and how each write ended.
FILL = r'''
import json, os
def fill(name, size):
    done = 0
    try:
        with open(name, "wb") as f:
            while done < size:
                done += f.write(b"x" * min(2**20, size - done))
        return [name, done, None]
    except OSError as e:
        return [name, done, e.errno]
runs = [fill(f"f{i}", 20 * 2**20) for i in range(5)]
for name in os.listdir("."):
    if name.startswith("f"):
        os.unlink(name)
runs.append(fill("big", 200 * 2**20))
st = os.statvfs(".")
print("RESULT " + json.dumps({"runs": runs, "free": st.f_bavail * st.f_frsize}))
'''

MANY_FILES = r'''
import json, os, time
os.mkdir("many")
made, err = 0, None
# Twice: IPython's history thread may hold an inode for its sqlite journal while the
# first loop runs and free it after; the second loop takes it back, so the count from
# the host is not racing a journal.
for attempt in range(2):
    if attempt:
        time.sleep(1)
    try:
        while made < 200:
            open(f"many/{made}", "w").close()
            made += 1
    except OSError as e:
        err = e.errno
print("RESULT " + json.dumps({"made": made, "errno": err}))
'''


def leftovers(kernel_dir: Path) -> dict:
    """What of a kernel's own filesystem is still on the host."""
    image = kernel_dir / workfs.DISK / workfs.IMAGE
    return {
        "mounts": workfs.mounts_under(kernel_dir),
        "loops": workfs.loops_of(image),
        "image": image.exists(),
    }


async def gone(kernel_dir: Path, within: float = 5.0) -> dict:
    """``leftovers`` once nothing is left, or after ``within`` s (a container's binds go
    with its mount namespace, a moment after its removal)."""
    deadline = time.monotonic() + within
    while True:
        left = leftovers(kernel_dir)
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)


async def run_json(kc, code: str) -> dict:
    out = await run(kc, code, timeout=120)
    assert out["status"] == "ok", out
    # Found by its marker: IPython's history thread may print into the same stream,
    # even on the same line, once the inodes run out (one write per result, so never
    # between the marker and its JSON).
    text = out["stdout"]
    assert "RESULT " in text, out
    return json.JSONDecoder().raw_decode(text[text.rindex("RESULT ") + len("RESULT "):])[0]


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_writes_past_disk_limit_fail_with_enospc_and_nothing_lands_over_it(
    backend, start_kernel, docker_cleanup
):
    km, kc = await start_kernel(LIMITS, provisioner=backend)
    prov = km.provisioner
    kernel_dir = Path(prov.kernel_dir)
    info = await prov.get_provisioner_info()
    assert info["enforcement"]["disk_limit"].startswith(
        "hard (own ext4 filesystem of 50M, loop device"), info["enforcement"]
    assert info["enforcement"]["files_limit"].startswith("hard (own ext4 filesystem"), info
    mounts = leftovers(kernel_dir)["mounts"]
    assert sorted(mounts) == sorted(str(kernel_dir / n) for n in workfs.ON_FS), mounts

    res = await run_json(kc, FILL)
    errnos = [r[2] for r in res["runs"]]
    assert errnos[:2] == [None, None], res  # 40 MB fit
    assert 28 in errnos[2:5], res  # the third 20 MB file does not
    assert errnos[5] == 28, res  # nor 200 MB, in the emptied dir: ENOSPC before EFBIG
    # All of disk_limit (less ipykernel's own files in HOME and a write that did not
    # fit whole), never more.
    assert 47 * M <= res["runs"][5][1] <= 50 * M, res
    used = await asyncio.to_thread(dir_usage, str(kernel_dir / "work"))
    assert used.bytes <= 50 * M, f"{used.bytes - 50 * M} bytes over disk_limit"
    assert await km.is_alive() and prov.exit_reason is None, prov.exit_reason
    assert prov.limit_trips == [], prov.limit_trips
    # The watchdog leaves the dirs on the filesystem alone.
    assert prov.watchdog is None or prov.watchdog.disk_checks == 0

    # Room again once the kernel deletes.
    out = await run(kc, "import os\nos.unlink('big')\nopen('again', 'wb').write(b'y' * 30 * 2**20)"
                        "\nprint(f\"<{os.path.getsize('again')}>\")")
    # (Marked: IPython's history thread may complain into the same stream.)
    assert f"<{30 * 2**20}>" in out["stdout"], out

    await km.shutdown_kernel(now=True)
    assert await gone(kernel_dir) == {"mounts": [], "loops": [], "image": False}
    assert not kernel_dir.exists()


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_files_past_files_limit_fail_with_enospc(backend, start_kernel, docker_cleanup):
    km, kc = await start_kernel({**LIMITS, "files_limit": 100}, provisioner=backend)
    res = await run_json(kc, MANY_FILES)
    assert res["errno"] == 28, res
    # ipykernel's own files in HOME take some of the 100.
    assert 50 <= res["made"] < 100, res
    # Full at exactly files_limit files and dirs -- not at the 16-inode rounding of
    # ext4's tables (workfs.HELD takes those) -- counted from the host.
    kernel_dir = km.provisioner.kernel_dir
    seen = sum(dir_usage(str(kernel_dir / name)).files for name in workfs.ON_FS)
    assert seen == 100, (seen, res)
    assert await km.is_alive() and km.provisioner.exit_reason is None
    out = await run(kc, "import shutil\nshutil.rmtree('many')\nopen('one', 'w').close()\n"
                        "print('<ok>')")
    # IPython's history thread may say, anywhere in the same stream (between print's two
    # writes too), that it could not save while the inodes ran out.
    assert "<ok>" in out["stdout"], out
    assert out["error"] is None, out


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_restart_keeps_the_filesystem_and_its_files(backend, start_kernel, docker_cleanup):
    km, kc = await start_kernel(LIMITS, provisioner=backend)
    kernel_dir = Path(km.provisioner.kernel_dir)
    image = kernel_dir / workfs.DISK / workfs.IMAGE
    loops = workfs.loops_of(image)
    await run(kc, "open('kept', 'w').write('still here')")
    await km.restart_kernel(now=True)
    await kc.wait_for_ready(timeout=60)
    out = await run(kc, "print(open('kept').read())")
    assert out["stdout"].strip() == "still here", out
    assert workfs.loops_of(image) == loops and len(loops) == 1
    info = await km.provisioner.get_provisioner_info()
    assert info["enforcement"]["disk_limit"].startswith("hard (own ext4"), info["enforcement"]


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_reaper_removes_an_orphans_filesystem(backend, start_kernel, docker_cleanup):
    km, kc = await start_kernel(LIMITS, provisioner=backend)
    kc.stop_channels()
    prov = km.provisioner
    kernel_dir = Path(prov.kernel_dir)
    entry = prov.registry.read(km.kernel_id)
    assert entry["workfs"]["image"] == str(kernel_dir / workfs.DISK / workfs.IMAGE), entry
    assert entry["workfs"]["loop"].startswith("/dev/loop"), entry
    # Its server is gone (pid 0 never runs) and its idle clock ran out an hour ago.
    entry.update(server_pid=0, last_activity=time.time() - 7200, limits={"idle_timeout": 60})
    prov.registry.write(km.kernel_id, entry)

    reaped = await asyncio.to_thread(reap, prov.registry, all_servers=True)

    assert [o.kernel_id for o in reaped] == [km.kernel_id]
    assert await gone(kernel_dir) == {"mounts": [], "loops": [], "image": False}
    assert not kernel_dir.exists()


# An agent service that starts a kernel, writes into its work dir and crashes.
CRASHING_AGENT = r"""
import asyncio, os
from jupyter_client.manager import AsyncKernelManager
async def main():
    km = AsyncKernelManager(kernel_name="quota")
    await km.start_kernel()
    kc = km.client(); kc.start_channels(); await kc.wait_for_ready(timeout=60)
    await kc.execute_interactive("_ = open('kept', 'w').write('survived')", timeout=60)
    print(km.kernel_id, flush=True)
    os._exit(0)  # no shutdown, nothing cleaned up
asyncio.run(main())
"""


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_an_adopted_kernel_keeps_its_filesystem(
    backend, jupyter_path, recovery_env, monkeypatch, docker_cleanup  # noqa: F811
):
    env, state, _ = recovery_env
    for key in ("LIMITED_PROVISIONER_STATE_DIR", "LIMITED_PROVISIONER_SERVER_ID"):
        monkeypatch.setenv(key, env[key])
    write_kernelspec(jupyter_path, "quota", LIMITS, backend)
    out_file = jupyter_path / "agent.out"

    def crashing_agent() -> None:
        # To a file: the surviving kernel inherits the agent's stdout.
        with open(out_file, "w") as f:
            subprocess.run([sys.executable, "-c", CRASHING_AGENT], stdout=f,
                           stderr=subprocess.STDOUT, env={**os.environ}, timeout=120,
                           check=True)

    await asyncio.to_thread(crashing_agent)
    kid = out_file.read_text().strip().splitlines()[-1]
    km = await adopt(kid, state_dir=state)
    prov = km.provisioner
    kernel_dir = Path(prov.kernel_dir)
    kc = km.client()
    kc.start_channels()
    try:
        assert prov.workfs is not None and prov.workfs.hard, prov.workfs
        enforcement = (await prov.get_provisioner_info())["enforcement"]
        assert enforcement["disk_limit"].startswith("hard (own ext4 filesystem of 50M"), (
            enforcement)
        await kc.wait_for_ready(timeout=30)
        out = await run(kc, "print(open('kept').read())\n"
                            "open('more', 'wb').write(b'x' * 60 * 2**20)")
        # (IPython's history thread may complain into stdout once the disk is full.)
        assert out["stdout"].startswith("survived\n"), out
        assert "No space left on device" in (out["error"] or ""), out
        await asyncio.sleep(0.5)  # several watchdog rounds (every 0.1 s)
        assert prov.watchdog is None or prov.watchdog.disk_checks == 0
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    assert await gone(kernel_dir) == {"mounts": [], "loops": [], "image": False}
    assert not kernel_dir.exists()


async def test_the_kernel_cannot_reach_its_image(start_kernel):
    km, kc = await start_kernel(LIMITS)
    image = Path(km.provisioner.kernel_dir) / workfs.DISK / workfs.IMAGE
    assert image.exists()
    code = ("import os\nfor how, path in [('open', IMAGE), ('list', DISK)]:\n"
            "    try:\n        open(path, 'rb') if how == 'open' else os.listdir(path)\n"
            "        print('ALLOWED', how)\n"
            "    except OSError as e:\n        print(e.errno)\n")
    out = await run(kc, f"IMAGE, DISK = {str(image)!r}, {str(image.parent)!r}\n{code}")
    assert out["stdout"].split() == ["13", "13"], out  # EACCES: disk/ is root's 0700


async def test_own_filesystem_off_falls_back_to_the_watchdog(start_kernel):
    km, _kc = await start_kernel({**LIMITS, "own_filesystem": "off"})
    prov = km.provisioner
    text = (await prov.get_provisioner_info())["enforcement"]["disk_limit"]
    assert "best-effort total (watchdog on work dir every 0.4 s" in text, text
    assert "no own filesystem: own_filesystem is off" in text, text
    assert workfs.mounts_under(Path(prov.kernel_dir)) == []
    # disk_limit unset: no filesystem, nothing claimed.
    km2, _kc2 = await start_kernel({**LIMITS, "disk_limit": None})
    info = await km2.provisioner.get_provisioner_info()
    assert "disk_limit" not in info["enforcement"], info["enforcement"]
    assert workfs.mounts_under(Path(km2.provisioner.kernel_dir)) == []
    assert os.path.isdir(Path(km2.provisioner.kernel_dir) / "work")
