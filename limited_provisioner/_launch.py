"""Kernel launcher: ``python -m limited_provisioner._launch SPEC -- CMD...``.

Runs between fork and the kernel: it is the kernel's own process (it ``exec``s the
kernel command, so the pid jupyter_client holds is the kernel's pid).  Doing this in a
separate interpreter instead of a ``preexec_fn`` keeps the server safe: ``preexec_fn``
is unsafe in a threaded server (jupyter_server runs threads), and an error here is a
clean exit with a message instead of a half-forked server.

Order matters: join cgroups and unshare namespaces while still root, set rlimits,
drop supplementary groups, gid, then uid, forbid regaining privileges, then exec.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
EXIT_SANDBOX_FAILED = 121

_RLIMITS = {
    "data": resource.RLIMIT_DATA,
    "nofile": resource.RLIMIT_NOFILE,
    "fsize": resource.RLIMIT_FSIZE,
    "core": resource.RLIMIT_CORE,
    "nproc": resource.RLIMIT_NPROC,
}


def _fail(message: str) -> None:
    sys.stderr.write(f"limited-provisioner: cannot start kernel: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_SANDBOX_FAILED)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _unshare(libc: ctypes.CDLL, flags: int, what: str) -> None:
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        _fail(f"unshare({what}) failed: {os.strerror(err)}")


def _mount(libc: ctypes.CDLL, source: str, target: str, fstype: str | None, flags: int,
           options: str | None = None) -> None:
    if libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        options.encode() if options else None,
    ) != 0:
        _fail(f"mount {source} on {target} failed: {os.strerror(ctypes.get_errno())}")


def _expose(libc: ctypes.CDLL, exposures: dict[str, str], stage_root: str) -> None:
    """Make ``path`` reachable for the kernel's uid when an ancestor (``blocker``,
    e.g. a 0700 /root holding a pyenv interpreter) is not traversable by others.

    In our private mount namespace: bind ``path`` aside, cover ``blocker`` with an
    empty tmpfs (the kernel sees none of its other contents), and move ``path`` back.
    """
    staged = []
    for i, path in enumerate(sorted(exposures)):
        stage = os.path.join(stage_root, f".expose{i}")
        os.makedirs(stage, exist_ok=True)
        _mount(libc, path, stage, None, MS_BIND | MS_REC)
        staged.append((path, stage))
    for blocker in sorted(set(exposures.values())):
        _mount(libc, "tmpfs", blocker, "tmpfs", 0, "mode=0755,size=1m")
    for path, stage in staged:
        os.makedirs(path, exist_ok=True)
        _mount(libc, stage, path, None, MS_MOVE)
        os.rmdir(stage)


def apply(spec: dict) -> None:
    """Apply the sandbox described by ``spec`` to the current process."""
    pid = str(os.getpid())
    for procs_file in spec.get("cgroup_procs", []):
        try:
            with open(procs_file, "w") as f:
                f.write(pid)
        except OSError as e:
            _fail(f"joining cgroup {procs_file} failed: {e}")

    libc = _libc()
    if spec.get("unshare_net"):
        _unshare(libc, CLONE_NEWNET, "network")
    tmpfs = spec.get("tmpfs")
    exposures = spec.get("expose")
    if tmpfs or exposures:
        _unshare(libc, CLONE_NEWNS, "mount")
        # Private propagation first, so nothing we mount ever shows up on the host.
        _mount(libc, "none", "/", None, MS_REC | MS_PRIVATE)
        for target, options in (tmpfs or {}).items():
            _mount(libc, "tmpfs", target, "tmpfs", 0, options)
        if exposures:
            _expose(libc, exposures, spec["stage_dir"])

    for name, value in spec.get("rlimits", {}).items():
        soft, hard = value if isinstance(value, list) else (value, value)
        try:
            resource.setrlimit(_RLIMITS[name], (soft, hard))
        except (ValueError, OSError) as e:
            _fail(f"setrlimit {name}={value} failed: {e}")

    nice = spec.get("nice")
    if nice:
        os.nice(nice)

    uid, gid = spec.get("uid"), spec.get("gid")
    if gid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)
        if os.geteuid() == 0 and uid != 0:
            _fail("still root after setuid")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_NO_NEW_PRIVS) failed")

    cwd = spec.get("cwd")
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as e:
            _fail(f"cannot enter work dir {cwd}: {e}")


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        _fail("usage: python -m limited_provisioner._launch SPEC_JSON -- CMD...")
    spec = json.loads(argv[0])
    cmd = argv[2:]
    apply(spec)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        _fail(f"exec {cmd[0]!r} failed: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
