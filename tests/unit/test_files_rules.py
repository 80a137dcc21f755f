"""limited_provisioner.files without kernels: the path rules, and what a work dir the
"kernel" filled with links, FIFOs and hard links does to list/read/write/delete."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest

from limited_provisioner.files import (
    TEMP_PREFIX,
    FileNotFound,
    FilePathRefused,
    FileTooLarge,
    NotARegularFile,
    WorkDir,
    split_path,
)

KERNEL_UID = 64999  # a uid nobody uses: the "kernel" of the tests run as root


def run(coro):
    return asyncio.run(coro)


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


async def _read(wd: WorkDir, path: str) -> bytes:
    return b"".join([c async for c in wd.read(path)])


@pytest.mark.parametrize("path", [
    "", "/", "/etc/passwd", "../x", "a/../../x", "a/..", "..", ".", "./", "a\x00b",
    "x" * 256, "a/" * 40 + "f", "/".join(["d"] * 600),
])
def test_paths_that_leave_or_name_nothing_are_refused(path):
    with pytest.raises(FilePathRefused):
        split_path(path)


@pytest.mark.parametrize(("path", "parts"), [
    ("a.csv", ["a.csv"]), ("d/e/f.png", ["d", "e", "f.png"]), ("./a//b/", ["a", "b"]),
    ("..a/b..", ["..a", "b.."]), (".hidden", [".hidden"]),
])
def test_relative_paths_are_split_into_components(path, parts):
    assert split_path(path) == parts


def test_the_refusals_say_what_to_do():
    with pytest.raises(FilePathRefused, match="relative to the session's work dir"):
        split_path("/etc/passwd")
    with pytest.raises(FilePathRefused, match="contains '..'"):
        split_path("../x")


@pytest.fixture
def work(tmp_path) -> Path:
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    return work


def test_round_trip_listing_and_delete(work):
    wd = WorkDir(work)
    info = run(wd.write("sub/dir/data.bin", _chunks(b"ab", b"", b"cd"), size=4))
    assert (info.path, info.size) == ("sub/dir/data.bin", 4)
    assert (work / "sub/dir/data.bin").read_bytes() == b"abcd"
    assert stat.S_IMODE((work / "sub/dir/data.bin").stat().st_mode) == 0o644
    run(wd.write("top.txt", _chunks(b"x"), size=1))
    run(wd.write("top.txt", _chunks(b"replaced"), size=None))  # replaces
    (work / ".hidden").write_text("h")
    assert run(_read(wd, "top.txt")) == b"replaced"
    listing = run(wd.list_files())
    assert [(f.path, f.size) for f in listing.files] == [("sub/dir/data.bin", 4), ("top.txt", 8)]
    assert not listing.truncated
    assert ".hidden" in [f.path for f in run(wd.list_files(hidden=True)).files]
    run(wd.delete("top.txt"))
    with pytest.raises(FileNotFound):
        run(wd.delete("top.txt"))
    with pytest.raises(FileNotFound):
        run(_read(wd, "nothing/here"))
    assert not [p for p in work.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_links_fifos_and_dirs_are_never_followed_or_opened(work, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    os.symlink(outside / "secret", work / "link")
    os.symlink(outside, work / "dirlink")
    os.mkfifo(work / "fifo")
    (work / "adir").mkdir()
    wd = WorkDir(work)
    with pytest.raises(FilePathRefused, match="symbolic link"):
        run(_read(wd, "link"))
    with pytest.raises(FilePathRefused, match="symbolic link"):
        run(_read(wd, "dirlink/secret"))
    with pytest.raises(FilePathRefused, match="symbolic link"):
        run(wd.write("dirlink/new", _chunks(b"x")))
    with pytest.raises(NotARegularFile, match="FIFO"):
        run(_read(wd, "fifo"))  # O_NONBLOCK: returns at once, no writer needed
    with pytest.raises(NotARegularFile, match="directory"):
        run(_read(wd, "adir"))
    with pytest.raises(NotARegularFile):
        run(wd.write("fifo", _chunks(b"x")))
    with pytest.raises(NotARegularFile):
        run(wd.delete("adir"))
    with pytest.raises(FilePathRefused, match="symbolic link"):
        run(wd.write("link", _chunks(b"mine")))
    assert [f.path for f in run(wd.list_files()).files] == []
    # Deleting a link removes the link, never its target.
    run(wd.delete("link"))
    run(wd.delete("dirlink"))
    assert not (work / "link").is_symlink() and not (work / "dirlink").is_symlink()
    assert (outside / "secret").read_text() == "secret"
    assert sorted(os.listdir(outside)) == ["secret"]
    assert sorted(os.listdir(work)) == ["adir", "fifo"]


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership needs root")
def test_files_of_another_owner_are_not_read_and_uploads_are_the_kernels(work, tmp_path):
    os.chown(work, KERNEL_UID, KERNEL_UID)
    root_file = tmp_path / "rootfile"
    root_file.write_text("root only")
    os.chmod(root_file, 0o600)
    os.link(root_file, work / "hardlink")  # what protected_hardlinks keeps a kernel from
    wd = WorkDir(work, uid=KERNEL_UID, gid=KERNEL_UID)
    with pytest.raises(FilePathRefused, match="not the kernel's own file"):
        run(_read(wd, "hardlink"))
    # Replacing it renames a new file over the name: the other link keeps its bytes.
    run(wd.write("hardlink", _chunks(b"new"), size=3))
    assert root_file.read_text() == "root only"
    st = (work / "hardlink").stat()
    assert (st.st_uid, st.st_gid, st.st_nlink) == (KERNEL_UID, KERNEL_UID, 1)
    run(wd.write("d/e", _chunks(b"x"), mode=0o600))
    assert (work / "d").stat().st_uid == KERNEL_UID
    assert stat.S_IMODE((work / "d/e").stat().st_mode) == 0o600
    # A work dir that is not the kernel's is not served at all.
    with pytest.raises(Exception, match="not owned by the kernel's uid"):
        run(WorkDir(work, uid=KERNEL_UID + 1).list_files())


def test_uploads_beyond_disk_limit_are_refused_and_leave_nothing(work):
    (work / "used").write_bytes(b"u" * 300_000)
    wd = WorkDir(work, disk_limit=1_000_000)
    # Announced: refused before a byte is read from the body.
    consumed = []

    async def body():
        consumed.append(1)
        yield b"x"

    with pytest.raises(FileTooLarge) as e:
        run(wd.write("big", body(), size=900_000))
    assert e.value.status == 413 and e.value.limit == 1_000_000
    assert "disk_limit=976.6K" in str(e.value) and not consumed
    # Unannounced: stopped as soon as it no longer fits, its temp file removed.
    with pytest.raises(FileTooLarge, match="more than"):
        run(wd.write("big", _chunks(*[b"y" * 100_000] * 20)))
    assert sorted(os.listdir(work)) == ["used"]
    # A body longer than announced is not trusted either.
    with pytest.raises(FileTooLarge):
        run(wd.write("small", _chunks(b"z" * 10, b"z" * 10), size=10))
    assert sorted(os.listdir(work)) == ["used"]
    run(wd.write("fits", _chunks(b"f" * 100_000), size=100_000))
    run(wd.write_bytes("fits2", b"g" * 1000))
    assert run(wd.read_bytes("fits2", 1000)) == b"g" * 1000
    with pytest.raises(FileTooLarge):
        run(wd.read_bytes("fits", 1000))


def test_temp_names_are_reserved_and_listing_is_bounded(work):
    wd = WorkDir(work)
    with pytest.raises(FilePathRefused):
        run(wd.write(TEMP_PREFIX + "x", _chunks(b"x")))
    for i in range(30):
        (work / f"f{i:02d}").write_text("x")
    deep = work
    for _ in range(6):
        deep = deep / "d"
        deep.mkdir()
        (deep / "f").write_text("x")
    listing = run(wd.list_files(max_entries=10))
    assert listing.truncated and len(listing.files) <= 10
    listing = run(wd.list_files(max_depth=3))
    assert listing.truncated
    assert max(f.path.count("/") for f in listing.files) == 2


def test_a_kernel_without_a_private_work_dir_is_not_served(tmp_path):
    from types import SimpleNamespace

    from limited_provisioner.files import FilesUnavailable
    from limited_provisioner.limits import Limits

    prov = SimpleNamespace(kdir=None, work_folder=None, uid=None, gid=None, limits=Limits())
    with pytest.raises(FilesUnavailable, match="no work dir"):
        WorkDir.of(prov)
    prov.kdir = SimpleNamespace(work=tmp_path, kernels_dir=tmp_path, kernel_id="k")
    prov.work_folder = SimpleNamespace(path="/srv/notebooks")
    with pytest.raises(FilesUnavailable, match="host folder /srv/notebooks") as e:
        WorkDir.of(prov)
    assert e.value.status == 409


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_enospc_while_writing_is_file_too_large(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        # disk_limit above what the filesystem really has: the write itself hits ENOSPC.
        wd = WorkDir(small, disk_limit=64 * 1024 * 1024)
        with pytest.raises(FileTooLarge, match="disk_limit=64M") as e:
            run(wd.write("big", _chunks(*[b"z" * (1 << 20)] * 4)))
        assert e.value.limit == 64 * 1024 * 1024
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
