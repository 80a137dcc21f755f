"""The host-wide uid allocator (``limited_provisioner.uids``) against real processes,
files and SysV IPC objects: no mocks.

Tests that use the real lease dir (/run/limited-provisioner/uids) only use uids of
``TEST_RANGE``, far from the default kernel_uid_range (64000-64999) the rest of the
suite starts kernels in, and kernel ids starting with ``KID_PREFIX``; the ``real_leases``
fixture removes every lease, released record and round-robin pointer they leave, and
each test kills the processes and removes the files and IPC objects it made, also when
it fails.  Only the corner cases of the lease dir itself move it to a temp dir.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from limited_provisioner import uid_holders, uid_lease_dir, uids
from limited_provisioner.errors import KernelLimitError, SandboxUnavailableError
from limited_provisioner.registry import Registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="allocating uids needs root")

TEST_RANGE = (63000, 63009)
KID_PREFIX = "lp-uid-test-"
FORK = multiprocessing.get_context("fork")


def kid() -> str:
    return f"{KID_PREFIX}{uuid.uuid4()}"


def register(state_dir: Path, kernel_id: str) -> None:
    """Register a kernel the way a server does, which keeps its lease valid."""
    Registry(state_dir).write(
        kernel_id, {"kernel_id": kernel_id, "state": "running", "created": time.time()}
    )


def unregister(state_dir: Path, kernel_id: str) -> None:
    Registry(state_dir).remove(kernel_id)


def remove_test_leases() -> None:
    """Drop every lease, released record and pointer of TEST_RANGE that tests made."""
    dir_fd = uids._open_lease_dir(create=False)
    if dir_fd is None:
        return
    try:
        with uid_lease_dir.locked(dir_fd, uids.lease_dir()):
            for name in os.listdir(dir_fd):
                uid = name.removesuffix(uids.RELEASED)
                if not (uid.isdigit() and TEST_RANGE[0] <= int(uid) <= TEST_RANGE[1]):
                    continue
                record = uids._read_record(dir_fd, name)
                if record is None or str(record.get("kernel_id", "")).startswith(KID_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dir_fd)
            pointers = uids._read_next(dir_fd)
            for key in list(pointers):
                low, _, high = key.partition("-")
                if TEST_RANGE[0] <= int(low) and int(high) <= TEST_RANGE[1]:
                    del pointers[key]
            uid_lease_dir.write_json(dir_fd, "next", pointers)
    finally:
        os.close(dir_fd)


@pytest.fixture
def real_leases(monkeypatch):
    """The real, host-wide lease dir; TEST_RANGE must be unused on this host."""
    monkeypatch.delenv(uids.LEASE_DIR_ENV, raising=False)
    remove_test_leases()  # a previous run that was killed outright
    low, high = TEST_RANGE
    busy = {
        **uid_holders.process_holders(low, high),
        **uid_holders.ipc_holders(low, high),
        **uid_holders.file_holders(low, high),
    }
    if busy:
        pytest.fail(f"test uids {low}-{high} are in use on this host: {busy}")
    foreign = [lease for lease in uids.leases() if low <= lease["uid"] <= high]
    if foreign:
        pytest.fail(f"test uids {low}-{high} are leased outside the tests: {foreign}")
    yield
    remove_test_leases()


@pytest.fixture
def state_dir():
    """A fresh state dir under /var/lib (where a root server keeps its own)."""
    made = []

    def make() -> Path:
        path = Path(tempfile.mkdtemp(prefix="lp-uid-test-", dir="/var/lib"))
        made.append(path)
        Registry(path).ensure()
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run_as():
    """Start a command as a uid (and its gid, no supplementary groups); killed after."""
    procs: list[subprocess.Popen] = []

    def start(uid: int, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(
            argv, user=uid, group=uid, extra_groups=[], cwd="/", **kwargs
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


# -- no uid shared across state dirs ---------------------------------------------------


def test_two_state_dirs_get_different_uids(real_leases, state_dir):
    dirs = [state_dir(), state_dir()]
    kernels = [kid(), kid()]
    for d, k in zip(dirs, kernels):
        register(d, k)
    got = [uids.allocate(k, d, TEST_RANGE) for d, k in zip(dirs, kernels)]
    assert got[0] != got[1]
    for uid, d, k in zip(got, dirs, kernels):
        lease = uids.lease_of(uid)
        assert lease["kernel_id"] == k
        assert lease["state_dir"] == str(d)
        assert lease["pid"] == os.getpid()


def _allocate_rounds(
    directory: str, rounds: int, hold: int, barrier, results
) -> None:  # pragma: no cover - runs in a forked child
    """Child of the concurrency test: allocate in lockstep with the other child."""
    try:
        for i in range(rounds):
            k = kid()
            register(Path(directory), k)
            barrier.wait(timeout=30)
            uid = uids.allocate(k, directory, TEST_RANGE, quarantine=0)
            results.put(("round", i, uid, k))
            barrier.wait(timeout=30)  # both hold their lease here
            uids.release(uid, k)
        barrier.wait(timeout=30)
        for _ in range(hold):
            k = kid()
            register(Path(directory), k)
            results.put(("held", -1, uids.allocate(k, directory, TEST_RANGE, quarantine=0), k))
    except BaseException as exc:
        results.put(("error", -1, -1, repr(exc)))
        raise


def test_concurrent_allocations_from_two_processes_never_share(real_leases, state_dir):
    rounds, hold = 20, 5  # 2 x 5 held = every uid of TEST_RANGE at once
    barrier = FORK.Barrier(2)
    results = FORK.Queue()
    children = [
        FORK.Process(
            target=_allocate_rounds, args=(str(state_dir()), rounds, hold, barrier, results)
        )
        for _ in range(2)
    ]
    for child in children:
        child.start()
    try:
        records = [results.get(timeout=60) for _ in range(2 * (rounds + hold))]
    finally:
        for child in children:
            child.join(timeout=30)
            if child.exitcode is None:
                os.kill(child.pid, signal.SIGKILL)
                child.join()
    assert [r for r in records if r[0] == "error"] == []
    assert [child.exitcode for child in children] == [0, 0]
    by_round: dict[int, list[int]] = {}
    for kind, i, uid, _ in records:
        if kind == "round":
            by_round.setdefault(i, []).append(uid)
    assert len(by_round) == rounds
    for i, pair in by_round.items():
        assert len(pair) == 2 and pair[0] != pair[1], f"round {i}: both got {pair}"
    held = [uid for kind, _, uid, _ in records if kind == "held"]
    assert sorted(held) == list(range(TEST_RANGE[0], TEST_RANGE[1] + 1))
    for kind, _, uid, k in records:
        if kind == "held":
            assert uids.lease_of(uid)["kernel_id"] == k


def test_same_kernel_gets_its_own_lease_back(real_leases, state_dir):
    d, k = state_dir(), kid()
    register(d, k)
    first = uids.allocate(k, d, TEST_RANGE)
    assert uids.allocate(k, d, TEST_RANGE) == first
    assert [lease["uid"] for lease in uids.leases() if lease["kernel_id"] == k] == [first]


# -- no reuse right after release ---------------------------------------------------


def test_released_uid_sits_out_the_quarantine(real_leases, state_dir):
    uid_range = (63000, 63002)
    d = state_dir()
    kernels = [kid() for _ in range(4)]
    for k in kernels:
        register(d, k)
    first = uids.allocate(kernels[0], d, uid_range)
    uids.release(first, kernels[0])
    unregister(d, kernels[0])
    others = {uids.allocate(kernels[1], d, uid_range), uids.allocate(kernels[2], d, uid_range)}
    assert first not in others and len(others) == 2

    with pytest.raises(KernelLimitError) as refused:
        uids.allocate(kernels[3], d, uid_range)
    message = str(refused.value)
    assert refused.value.limit == "kernel_uid_range"
    assert "63000-63002" in message
    assert "2 leased" in message
    assert "1 in quarantine" in message
    assert "widen kernel_uid_range or lower max_kernels" in message

    # Quarantine was the only reason: without it the released uid comes back.
    assert uids.allocate(kernels[3], d, uid_range, quarantine=0) == first
    assert uids.lease_of(first)["kernel_id"] == kernels[3]


def test_round_robin_skips_a_just_freed_uid(real_leases, state_dir):
    uid_range = (63003, 63005)
    d = state_dir()
    a, b = kid(), kid()
    register(d, a)
    register(d, b)
    first = uids.allocate(a, d, uid_range, quarantine=0)
    uids.release(first, a)
    assert uids.allocate(b, d, uid_range, quarantine=0) != first


def test_exhausted_range_names_the_leases(real_leases, state_dir):
    uid_range = (63009, 63009)
    d, a, b = state_dir(), kid(), kid()
    register(d, a)
    uids.allocate(a, d, uid_range)
    with pytest.raises(KernelLimitError) as refused:
        uids.allocate(b, d, uid_range)
    message = str(refused.value)
    assert "63009-63009 (1 uids): 1 leased" in message
    assert "quarantine" not in message


# -- no uid that still has something on the host -----------------------------------------


def assert_blocked_then_free(uid: int, other: int, state_dir: Path, evidence: str, remove) -> None:
    """``uid`` is skipped (``other`` is handed out instead, then nothing) until
    ``remove()`` takes away what it has on the host."""
    uid_range = (min(uid, other), max(uid, other))
    a, b = kid(), kid()
    register(state_dir, a)
    register(state_dir, b)
    assert uids.allocate(a, state_dir, uid_range) == other
    with pytest.raises(KernelLimitError) as refused:
        uids.allocate(b, state_dir, uid_range)
    message = str(refused.value)
    assert "1 leased" in message
    assert "1 still owning processes, SysV IPC objects or files" in message
    assert f"uid {uid}: " in message and evidence in message
    remove()
    assert uids.allocate(b, state_dir, uid_range) == uid


def test_uid_with_a_running_process_is_skipped(real_leases, state_dir, run_as):
    proc = run_as(63000, ["sleep", "30"])
    assert_blocked_then_free(63000, 63001, state_dir(), f"process {proc.pid} (sleep)",
                             lambda: kill(proc))


def test_uid_kept_only_as_real_uid_is_found(real_leases, state_dir):
    """What a setuid-root program the uid ran looks like: euid 0, real uid the kernel's.

    /proc/<pid> is owned by the effective uid, so only its status shows the kernel's.
    """
    proc = subprocess.Popen(
        ["sleep", "30"], cwd="/", preexec_fn=lambda: os.setresuid(63002, 0, 0)
    )
    try:
        assert os.stat(f"/proc/{proc.pid}").st_uid == 0
        assert_blocked_then_free(63002, 63003, state_dir(), f"process {proc.pid} (sleep)",
                                 lambda: kill(proc))
    finally:
        if proc.poll() is None:
            kill(proc)


@pytest.mark.parametrize("scratch", ["/var/tmp", "/dev/shm", "/tmp"])
def test_uid_owning_a_file_in_a_scratch_dir_is_skipped(real_leases, state_dir, scratch):
    if not os.path.isdir(scratch):
        pytest.skip(f"no {scratch} on this host")
    path = Path(scratch) / f"{KID_PREFIX}{uuid.uuid4().hex}"
    path.write_text("the previous tenant's secret")
    try:
        os.chmod(path, 0o600)
        os.chown(path, 63004, 63004)
        assert_blocked_then_free(63004, 63005, state_dir(), str(path), path.unlink)
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


IPC_KINDS = {"shm": (["-M", "4096"], "-m"), "msg": (["-Q"], "-q"), "sem": (["-S", "1"], "-s")}


@pytest.mark.skipif(shutil.which("ipcmk") is None, reason="needs ipcmk (util-linux)")
@pytest.mark.parametrize("table", sorted(IPC_KINDS))
def test_uid_owning_a_sysv_ipc_object_is_skipped(real_leases, state_dir, run_as, table):
    make, remove_flag = IPC_KINDS[table]
    out = run_as(63006, ["ipcmk", *make], stdout=subprocess.PIPE, text=True)
    stdout, _ = out.communicate(timeout=10)
    assert out.returncode == 0, stdout
    ipc_id = stdout.split()[-1]
    removed = False

    def remove() -> None:
        nonlocal removed
        subprocess.run(["ipcrm", remove_flag, ipc_id], check=True)
        removed = True

    try:
        assert_blocked_then_free(63006, 63007, state_dir(), f"SysV {table} id {ipc_id}", remove)
    finally:
        if not removed:
            subprocess.run(["ipcrm", remove_flag, ipc_id], check=False)


def _shm_given_away(uid: int, write_fd: int) -> None:  # pragma: no cover - forked child
    """As ``uid``: create a shm segment, then make another uid (nobody) its owner."""
    status = 1
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmget.restype = ctypes.c_int
        shm_id = libc.shmget(0, ctypes.c_size_t(4096), 0o600 | 0o1000)  # IPC_PRIVATE, IPC_CREAT
        if shm_id < 0:
            raise OSError(ctypes.get_errno(), "shmget")
        buf = ctypes.create_string_buffer(512)  # struct shmid_ds, with room to spare
        if libc.shmctl(shm_id, 2, buf) != 0:  # IPC_STAT
            raise OSError(ctypes.get_errno(), "shmctl(IPC_STAT)")
        # struct ipc_perm starts with key_t __key, then uid_t uid, gid_t gid.
        ctypes.c_uint32.from_buffer(buf, 4).value = 65534
        ctypes.c_uint32.from_buffer(buf, 8).value = 65534
        if libc.shmctl(shm_id, 1, buf) != 0:  # IPC_SET
            raise OSError(ctypes.get_errno(), "shmctl(IPC_SET)")
        os.write(write_fd, str(shm_id).encode())
        status = 0
    finally:
        os._exit(status)


def test_sysv_object_given_to_another_owner_still_blocks_its_creator(real_leases, state_dir):
    """The creator of a SysV object keeps control of it after handing it to nobody."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read_fd)
        _shm_given_away(63008, write_fd)
    os.close(write_fd)
    shm_id = os.read(read_fd, 64).decode()
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and shm_id
    removed = False

    def remove() -> None:
        nonlocal removed
        subprocess.run(["ipcrm", "-m", shm_id], check=True)
        removed = True

    try:
        rows = [line.split() for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
        (row,) = [r for r in rows if r[1] == shm_id]
        assert (row[7], row[9]) == ("65534", "63008")  # owner nobody, creator 63008
        assert_blocked_then_free(63008, 63009, state_dir(), f"SysV shm id {shm_id}", remove)
    finally:
        if not removed:
            subprocess.run(["ipcrm", "-m", shm_id], check=False)


# -- stale leases ------------------------------------------------------------------------


def _allocate_and_exit(kernel_id: str, directory: str, uid_range, results) -> None:
    results.put(uids.allocate(kernel_id, directory, uid_range))  # pragma: no cover


def test_stale_lease_is_reclaimed(real_leases, state_dir, run_as):
    uid_range = (63001, 63001)
    old_dir, new_dir = state_dir(), state_dir()
    old, new = kid(), kid()
    register(old_dir, old)
    register(new_dir, new)
    # Another server took the uid and is gone since (its kernel is still registered).
    results = FORK.Queue()
    child = FORK.Process(target=_allocate_and_exit, args=(old, str(old_dir), uid_range, results))
    child.start()
    assert results.get(timeout=30) == 63001
    child.join(timeout=30)
    assert child.exitcode == 0

    with pytest.raises(KernelLimitError, match="1 leased"):
        uids.allocate(new, new_dir, uid_range)  # registered: valid
    unregister(old_dir, old)
    proc = run_as(63001, ["sleep", "30"])
    with pytest.raises(KernelLimitError, match="1 leased"):
        uids.allocate(new, new_dir, uid_range)  # unregistered, but something of it runs
    kill(proc)
    assert uids.allocate(new, new_dir, uid_range) == 63001
    assert uids.lease_of(63001)["kernel_id"] == new


def test_unregistered_lease_holds_while_its_allocator_runs(real_leases, state_dir):
    """A server may take the uid before it registers the kernel."""
    uid_range = (63002, 63002)
    d = state_dir()
    uids.allocate(kid(), d, uid_range)  # no registry entry
    with pytest.raises(KernelLimitError, match="1 leased"):
        uids.allocate(kid(), d, uid_range)


# -- release ---------------------------------------------------------------------------


def test_release_only_ends_the_named_kernels_lease(real_leases, state_dir):
    d, k = state_dir(), kid()
    register(d, k)
    uid = uids.allocate(k, d, TEST_RANGE)
    uids.release(uid, "someone-else")
    assert uids.lease_of(uid)["kernel_id"] == k
    uids.release(uid, k)
    assert uids.lease_of(uid) is None
    released = uids._read_record(uids._open_lease_dir(create=False), f"{uid}{uids.RELEASED}")
    assert released["kernel_id"] == k and released["released"] <= time.time()
    uids.release(uid, k)  # again: nothing left to do, no error
    uids.release(63009 if uid != 63009 else 63008, k)  # never leased


# -- the lease dir itself (moved to a temp dir) -----------------------------------------


def test_default_lease_dir_is_host_wide(monkeypatch):
    monkeypatch.delenv(uids.LEASE_DIR_ENV, raising=False)
    assert uids.lease_dir() == Path("/run/limited-provisioner/uids") == uids.UID_LEASE_DIR


def test_lease_dir_is_created_root_only(tmp_path, monkeypatch, state_dir):
    leases_dir = tmp_path / "lp" / "uids"
    monkeypatch.setenv(uids.LEASE_DIR_ENV, str(leases_dir))
    assert uids.leases() == [] and uids.lease_of(63000) is None
    uids.release(63000, "nobody")  # no dir: nothing to release
    assert not leases_dir.parent.exists()

    d, k = state_dir(), kid()
    register(d, k)
    uid = uids.allocate(k, d, TEST_RANGE)
    for path in (leases_dir.parent, leases_dir):
        st = path.lstat()
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)
    assert (leases_dir / "lock").stat().st_mode & 0o777 == 0o600
    assert (leases_dir / str(uid)).stat().st_mode & 0o777 == 0o600
    lease = uids.lease_of(uid)
    assert set(lease) == {
        "uid", "kernel_id", "state_dir", "time", "clock", "pid", "pid_create_time"
    }
    assert [entry["uid"] for entry in uids.leases()] == [uid]


def refuses(match: str) -> None:
    with pytest.raises(SandboxUnavailableError, match=match):
        uids.allocate(kid(), "/var/lib/nowhere", TEST_RANGE)


def test_symlink_in_place_of_the_lease_dir_is_refused(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "lp").mkdir(mode=0o700)
    (tmp_path / "lp" / "uids").symlink_to(target)
    monkeypatch.setenv(uids.LEASE_DIR_ENV, str(tmp_path / "lp" / "uids"))
    refuses("is a symlink")
    with pytest.raises(SandboxUnavailableError, match="is a symlink"):
        uids.leases()
    assert list(target.iterdir()) == []  # nothing written through it


def test_symlink_in_place_of_the_parent_is_refused(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    (target / "uids").mkdir(parents=True, mode=0o700)
    (tmp_path / "lp").symlink_to(target)
    monkeypatch.setenv(uids.LEASE_DIR_ENV, str(tmp_path / "lp" / "uids"))
    refuses("is a symlink")
    assert list((target / "uids").iterdir()) == []


def test_file_in_place_of_the_lease_dir_is_refused(tmp_path, monkeypatch):
    (tmp_path / "lp").mkdir(mode=0o700)
    (tmp_path / "lp" / "uids").write_text("")
    monkeypatch.setenv(uids.LEASE_DIR_ENV, str(tmp_path / "lp" / "uids"))
    refuses("not a directory")


@pytest.mark.parametrize(
    "owner, mode", [(63000, 0o700), (0, 0o777), (0, 0o770), (0, 0o1777)]
)
def test_lease_dir_others_can_write_is_refused(tmp_path, monkeypatch, owner, mode):
    leases_dir = tmp_path / "lp" / "uids"
    leases_dir.mkdir(parents=True, mode=0o700)
    os.chown(leases_dir, owner, owner)
    os.chmod(leases_dir, mode)
    monkeypatch.setenv(uids.LEASE_DIR_ENV, str(leases_dir))
    refuses("must be owned by root and writable by root only")
    assert list(leases_dir.iterdir()) == []


def test_replaceable_grandparent_is_refused(tmp_path, monkeypatch):
    grandparent = tmp_path / "shared"
    grandparent.mkdir()
    os.chmod(grandparent, 0o777)  # anyone could swap our dir for theirs
    monkeypatch.setenv(uids.LEASE_DIR_ENV, str(grandparent / "lp" / "uids"))
    refuses("lets others than root replace it")
    assert list(grandparent.iterdir()) == []


# -- cost ---------------------------------------------------------------------------------


def test_allocate_is_fast(real_leases, state_dir, capsys):
    d = state_dir()
    took = []
    for _ in range(20):
        k = kid()
        register(d, k)
        start = time.perf_counter()
        uid = uids.allocate(k, d, TEST_RANGE, quarantine=0)
        took.append(time.perf_counter() - start)
        uids.release(uid, k)
    processes = sum(name.isdigit() for name in os.listdir("/proc"))
    with capsys.disabled():
        print(
            f"\nallocate: median {statistics.median(took) * 1000:.1f} ms, "
            f"max {max(took) * 1000:.1f} ms with {processes} processes"
        )
    assert statistics.median(took) < 0.1


# -- keys in the kernel's keyrings --------------------------------------------------------

# add_key(2) and keyctl(2) by syscall number (glibc has no wrappers; keyutils may be absent).
KEY_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}
KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -4, -5
KEYCTL_GET_KEYRING_ID, KEYCTL_CLEAR, KEYCTL_INVALIDATE = 0, 7, 21


def key_users() -> dict[int, int]:
    """uid -> keys the kernel counts for it (/proc/key-users: ``uid: usage n/ni ...``)."""
    found = {}
    for line in Path("/proc/key-users").read_text().splitlines():
        uid, _, rest = line.partition(":")
        found[int(uid)] = int(rest.split()[1].split("/")[0])
    return found


def _keyctl_as(uid: int, action: str, write_fd: int) -> None:  # pragma: no cover - forked child
    """As ``uid`` (no other identity): ``add`` a user key to its user keyring, ``clear``
    that keyring, or ``invalidate`` its user and user-session keyrings (what is left
    once the keys are gone). Writes the result (a key serial, or 0) to ``write_fd``."""
    status = 1
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        import platform

        add_key, keyctl = KEY_SYSCALLS[platform.machine()]
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long

        def call(number, *args):
            result = libc.syscall(ctypes.c_long(number), *args)
            if result < 0:
                raise OSError(ctypes.get_errno(), f"syscall {number}{args}")
            return result

        long = ctypes.c_long
        if action == "add":
            result = call(add_key, b"user", b"lp-test", b"the previous tenant's secret",
                          ctypes.c_size_t(28), ctypes.c_int(KEY_SPEC_USER_KEYRING))
        elif action == "clear":
            result = call(keyctl, long(KEYCTL_CLEAR), long(KEY_SPEC_USER_KEYRING))
        else:
            result = 0
            serials = [call(keyctl, long(KEYCTL_GET_KEYRING_ID), long(spec), long(1))
                       for spec in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING)]
            call(keyctl, long(KEYCTL_CLEAR), long(serials[0]))
            for serial in serials:
                call(keyctl, long(KEYCTL_INVALIDATE), long(serial))
        os.write(write_fd, str(result).encode())
        status = 0
    finally:
        os._exit(status)


def keyctl_as(uid: int, action: str) -> int:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(read_fd)
        _keyctl_as(uid, action, write_fd)
    os.close(write_fd)
    try:
        result = os.read(read_fd, 64).decode()
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and result, f"{action} as uid {uid} failed"
    return int(result)


def wait_keys(uid: int, predicate, timeout: float = 10) -> int:
    """Poll /proc/key-users until ``predicate(keys of uid)``; the kernel's key garbage
    collector runs asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        keys = key_users().get(uid, 0)
        if predicate(keys) or time.monotonic() > deadline:
            return keys
        time.sleep(0.1)


@pytest.mark.skipif(not os.path.exists("/proc/key-users"), reason="kernel without keys")
@pytest.mark.skipif(os.uname().machine not in KEY_SYSCALLS, reason="add_key number unknown")
def test_uid_with_keys_in_its_keyring_is_skipped(real_leases, state_dir):
    """A uid whose previous holder left a key in its user keyring (which outlives all of
    its processes) is skipped, and the refusal names the keys; it is handed out again
    once only its two empty keyrings are left.

    The user and user-session keyrings the kernel made for the uid stay (2 keys in
    /proc/key-users) after the key is gone and after every process of the uid has
    exited; they hold nothing, so they must not burn the uid for good."""
    uid, other = 63000, 63001
    assert key_users().get(uid, 0) == 0, f"uid {uid} already has keys: {key_users()}"
    d, a, b = state_dir(), kid(), kid()
    register(d, a)
    register(d, b)
    try:
        serial = keyctl_as(uid, "add")
        assert serial > 0
        assert wait_keys(uid, lambda n: n >= 1) >= 1, "the key is not in /proc/key-users"
        assert not uid_holders.process_holders(*TEST_RANGE), "a process of the test uids is left"

        assert uids.allocate(a, d, (uid, other)) == other  # 63000 comes first when free
        with pytest.raises(KernelLimitError) as refused:
            uids.allocate(b, d, (uid, other))
        message = str(refused.value)
        assert "1 leased" in message, message
        assert re.search(rf"uid {uid}: \d+ key\(s\) in its keyrings", message), message

        keyctl_as(uid, "clear")  # the key itself is gone...
        left = wait_keys(uid, lambda n: n <= 2)
        assert left == 2, f"uid {uid}: {left} keys after clearing its keyring"
        # ...and its two empty keyrings do not block it.
        assert uids.allocate(b, d, (uid, other)) == uid
        uids.release(uid, b)
    finally:
        keyctl_as(uid, "invalidate")
        left = wait_keys(uid, lambda n: n == 0)
        assert left == 0, f"uid {uid} still has {left} keys in /proc/key-users"
    assert uid not in key_users()
