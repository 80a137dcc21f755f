"""Fixtures of the containment suite: our kernels, decoy files and state dirs.

Everything made here is removed here, whatever the test did: kernels are shut down and
their containers removed by their kernel-id label; decoys and state dirs are deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from limited_provisioner.docker import LABEL_PREFIX

from ..conftest import _docker_client
from ..harness import shutdown_settled
from .containment import OWNER, Inotify, stat_record


@pytest.fixture(scope="session")
def docker_client():
    """As tests/conftest.py's, but the session only removes containers of *our* owner
    (other sessions on this host run kernels labelled with theirs)."""
    client = _docker_client()
    yield client
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}owner={OWNER}"}):
        with contextlib.suppress(Exception):
            c.remove(force=True)


@dataclass
class Decoy:
    """A root-only dir (0700) under /var/lib with a root-only file (0600) of known content
    and a subdir; kernels plant links to them. ``assert_untouched`` compares everything
    root could have changed by following such a link (owner, mode, content, links,
    ctime, the dir's entries)."""

    dir: Path
    secret: Path
    sub: Path
    content: bytes
    snapshot: dict = field(default_factory=dict)
    watch: Inotify | None = None

    def _record(self) -> dict:
        record = {}
        for path in (self.dir, self.secret, self.sub, self.sub / "keep"):
            record[str(path)] = stat_record(path)
        record["entries"] = sorted(os.listdir(self.dir))
        record["sub_entries"] = sorted(os.listdir(self.sub))
        return record

    def assert_untouched(self) -> None:
        # First what anyone did to it (reads included), then its state; our own reads
        # below are drained afterwards.
        events = self.watch.read()
        assert events == [], (
            f"someone (root: nothing else can) touched the decoy {len(events)} times, "
            f"first: {events[:6]}")
        try:
            self._assert_state()
        finally:
            self.watch.read()

    def _assert_state(self) -> None:
        st = os.lstat(self.secret)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_gid == 0, st
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert self.secret.read_bytes() == self.content, "decoy content changed"
        dst = os.lstat(self.dir)
        assert dst.st_uid == 0 and stat.S_IMODE(dst.st_mode) == 0o700, dst
        assert self._record() == self.snapshot, "decoy metadata changed"


@pytest.fixture
def lp_decoy():
    path = Path(tempfile.mkdtemp(prefix="lp-decoy-", dir="/var/lib"))
    decoy = None
    try:
        os.chmod(path, 0o700)
        content = b"lp-decoy " + os.urandom(16).hex().encode() + b"\n"
        secret = path / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with open(fd, "wb") as f:
            f.write(content)
        sub = path / "sub"
        sub.mkdir(mode=0o700)
        (sub / "keep").write_bytes(content)
        os.chmod(sub / "keep", 0o600)
        decoy = Decoy(path, secret, sub, content)
        decoy.snapshot = decoy._record()
        decoy.watch = Inotify([path, secret, sub, sub / "keep"])
        os.listdir(path)  # the watch sees an open of the dir: it works
        assert any("OPEN" in kinds for _, kinds, _ in decoy.watch.read())
        yield decoy
    finally:
        if decoy is not None and decoy.watch is not None:
            decoy.watch.close()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lp_state_dirs():
    """``make()`` -> a fresh state dir under /var/lib (root 0711, like the default)."""
    made: list[Path] = []

    def make() -> Path:
        path = Path(tempfile.mkdtemp(prefix="lp-sd-", dir="/var/lib"))
        made.append(path)
        os.chmod(path, 0o711)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def lp_kernels(lp_state_dirs, start_kernel):
    """``await lp_kernels(config, backend)`` -> (km, kc); torn down before the state dirs
    (this fixture depends on them). Shuts its kernels down and removes their containers
    by kernel-id label; conftest's ``start_kernel`` then kills anything left."""
    started = []

    async def start(config: dict, backend: str, **km_kwargs):
        km, kc = await start_kernel(config, provisioner=backend, **km_kwargs)
        started.append((km, kc, backend))
        return km, kc

    yield start

    for km, kc, backend in started:
        with contextlib.suppress(Exception):
            kc.stop_channels()
        with contextlib.suppress(Exception):
            await shutdown_settled(km)
        if "docker" in backend and km.kernel_id:
            import docker

            client = docker.from_env()
            for c in client.containers.list(
                all=True, filters={"label": f"{LABEL_PREFIX}kernel-id={km.kernel_id}"}
            ):
                with contextlib.suppress(Exception):
                    c.remove(force=True)
