"""The kernel's own filesystem as rules (limited_provisioner/workfs.py): its size, what
the enforcement plan says with and without it, what the watchdog still measures.
Nothing is mounted here (tests/test_disk_quota.py does that on real kernels)."""

from __future__ import annotations

from pathlib import Path

import pytest

from limited_provisioner.enforcement import (
    FILESYSTEM,
    WATCHDOG,
    container_plan,
    disk_measures,
    process_plan,
)
from limited_provisioner.errors import LimitConfigError
from limited_provisioner.kernel_dir import KernelDir
from limited_provisioner.limits import Limits
from limited_provisioner.settings import LimitedSettings
from limited_provisioner.watchdog import Watchdog
from limited_provisioner.workfs import BLOCK, OWN_INODES, Geometry, WorkFs

M, G = 2**20, 2**30
LIMITS = Limits(disk_limit=100 * M, files_limit=2000)
HARD = WorkFs(size=100 * M, files=2002, image="/k/disk/image", loop="/dev/loop3")
NO_LOOP = WorkFs(
    why_not="no /dev/loop-control (loop module not loaded, or a container without it)"
)


# -- geometry ---------------------------------------------------------------------------

@pytest.mark.parametrize(("disk", "files"), [
    (M, 16), (100 * M, 2000), (G, 50000), (10 * G, 50000), (10 * G, 16), (50 * M, None),
])
def test_the_image_holds_disk_limit_of_data_plus_what_ext4_keeps_for_itself(disk, files):
    geometry = Geometry.of(disk, files)
    assert geometry.image_bytes % BLOCK == 0
    assert geometry.image_bytes >= disk
    # Inode tables (256 B each, rounded up per 128M group) and 2% (at most 16M) held
    # back by ext4: never more than that on top.
    inodes = (files or disk // 16384) + OWN_INODES + 16 * (disk // (128 * M) + 1)
    tables = inodes * 256
    held_back = min((disk + tables) // 49 + BLOCK, 16 * M)
    assert geometry.image_bytes - disk <= tables + held_back + 2 * BLOCK
    if files is None:
        assert geometry.mkfs_args() == ["-i", "16384"]
    else:
        assert geometry.mkfs_args() == ["-N", str(files + OWN_INODES)]


# -- the plan -----------------------------------------------------------------------------

def process(workfs, host_folder=False, limits=LIMITS):
    return process_plan(
        limits, cgroups=("memory", "cpu", "pids"), own_uid=True, isolated=True, netns=True,
        nice=10, cpu_grace=0, scratch_dirs=("/tmp",), workfs=workfs, disk_interval=2.0,
        host_folder=host_folder,
    )


def container(workfs):
    return container_plan(LIMITS, log_max_size="1m", workfs=workfs, disk_interval=2.0)


PLANS = {
    "process, own filesystem: disk hard": (
        process(HARD), "disk_limit", FILESYSTEM,
        ("hard (own ext4 filesystem of 100M, loop device: work, connection and socket dirs; "
         "per file: RLIMIT_FSIZE; host filesystem read-only; private size-capped tmpfs on "
         "/tmp)"),
    ),
    "process, own filesystem: files hard, with the real inode count": (
        process(HARD), "files_limit", FILESYSTEM,
        "hard (own ext4 filesystem of 100M, loop device: 2002 files and dirs)",
    ),
    "docker, own filesystem: disk hard": (
        container(HARD), "disk_limit", FILESYSTEM,
        ("hard (own ext4 filesystem of 100M, loop device: work, connection and socket dirs; "
         "per file: ulimit fsize; /tmp: size-capped tmpfs)"),
    ),
    "docker, own filesystem: files hard": (
        container(HARD), "files_limit", FILESYSTEM,
        "hard (own ext4 filesystem of 100M, loop device: 2002 files and dirs)",
    ),
    "process, no loop device: disk best-effort, says why": (
        process(NO_LOOP), "disk_limit", WATCHDOG,
        ("hard per file (RLIMIT_FSIZE); best-effort total (watchdog on work dir every 2 s; "
         "no own filesystem: no /dev/loop-control (loop module not loaded, or a container "
         "without it); host filesystem read-only; private size-capped tmpfs on /tmp)"),
    ),
    "docker, no loop device: files best-effort, says why": (
        container(NO_LOOP), "files_limit", WATCHDOG,
        ("best-effort (watchdog on work dir every 2 s; no own filesystem: no "
         "/dev/loop-control (loop module not loaded, or a container without it))"),
    ),
    "process, own filesystem but a host folder: the cwd is the watchdog's": (
        process(HARD, host_folder=True), "disk_limit", WATCHDOG,
        ("hard in its home, connection and socket dirs (own ext4 filesystem of 100M, loop "
         "device); best-effort in its working dir (watchdog every 2 s: a host folder, its "
         "workspace); hard per file (RLIMIT_FSIZE); host filesystem read-only; private "
         "size-capped tmpfs on /tmp"),
    ),
}


@pytest.mark.parametrize(("plan", "name", "mechanism", "text"), PLANS.values(),
                         ids=PLANS.keys())
def test_plan_says_what_enforces_disk_and_files(plan, name, mechanism, text):
    assert (plan.measures[name].mechanism, plan.measures[name].text) == (mechanism, text)


def test_without_disk_limit_nothing_is_claimed_for_it():
    measures = disk_measures(Limits(files_limit=100), None, per_file="RLIMIT_FSIZE")
    assert set(measures) == {"files_limit"}
    assert measures["files_limit"].mechanism == WATCHDOG


def test_own_filesystem_takes_three_values_and_names_them_when_refused():
    assert LimitedSettings(own_filesystem="Required").own_filesystem == "required"
    with pytest.raises(LimitConfigError, match="own_filesystem='maybe' must be one of "
                                               "'auto', 'required', 'off'"):
        LimitedSettings(own_filesystem="maybe")


def test_a_record_round_trips_through_the_registry_entry():
    assert WorkFs.from_record(HARD.record()) == HARD
    assert WorkFs.from_record(NO_LOOP.record()) == NO_LOOP
    assert WorkFs.from_record(None) is None


# -- the watchdog -------------------------------------------------------------------------

KDIR = KernelDir(Path("/k"), "x", 64000, 64000)


def watchdog(plan, own_fs, work_dir=str(KDIR.work)):
    async def on_trip(kind, reason):  # never called here
        raise AssertionError(reason)

    return Watchdog.for_kernel("x", LIMITS, plan, KDIR, work_dir, interval=0.5,
                               on_trip=on_trip, own_fs=own_fs)


def test_the_watchdog_leaves_the_dirs_on_the_own_filesystem_alone():
    dog = watchdog(process(HARD), own_fs=True)
    assert dog.work_dir is None and dog.extra_dirs == ()
    assert not dog.watches_anything  # no memory watch either: the cgroup has it


def test_the_watchdog_measures_a_working_dir_elsewhere():
    dog = watchdog(process(HARD, host_folder=True), own_fs=True, work_dir="/notebooks")
    assert dog.work_dir == "/notebooks" and dog.extra_dirs == ()


def test_without_own_filesystem_the_watchdog_measures_every_kernel_dir():
    dog = watchdog(process(NO_LOOP), own_fs=False)
    assert dog.work_dir == str(KDIR.work)
    assert dog.extra_dirs == (str(KDIR.conn), str(KDIR.sock))
