"""examples/mcp_server/files_port.py's FALLBACK (used while limited_provisioner.files is
missing): paths resolved beneath the work dir without following links, regular files
only, no blocking on a FIFO, sizes bounded. A fake provisioner: no kernel needed."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def port(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("mcp_server.files_port", None)
    from mcp_server import files_port

    return files_port


@pytest.fixture
def prov(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "secret").write_text("host secret")
    return SimpleNamespace(work_dir=str(work), limits=SimpleNamespace(disk_limit=1000))


def fallback(port, name):
    return getattr(port, f"_fallback_{name}")


async def test_round_trip_and_listing(port, prov):
    write, read = fallback(port, "write_bytes"), fallback(port, "read_bytes")
    await write(prov, "a/b/c.bin", b"\x00\x01data")
    await write(prov, "top.txt", b"hi")
    await write(prov, "top.txt", b"replaced")
    assert await read(prov, "a/b/c.bin", 100) == b"\x00\x01data"
    assert await read(prov, "./top.txt", 100) == b"replaced"
    work = Path(prov.work_dir)
    os.symlink("../secret", work / "link")
    (work / ".hidden").mkdir()
    (work / ".hidden" / "x").write_text("x")
    listed = await fallback(port, "list_files")(prov)
    assert [f["path"] for f in listed] == ["a/b/c.bin", "top.txt"]
    assert listed[1]["size"] == len(b"replaced") and listed[1]["modified"] > 0
    assert not [p for p in os.listdir(work) if p.startswith(".upload-")]


@pytest.mark.parametrize("path", ["../secret", "/etc/passwd", "a/../../secret", "", ".", "x\x00"])
async def test_paths_leaving_the_work_dir_are_refused(port, prov, path):
    for call in (fallback(port, "read_bytes")(prov, path, 100),
                 fallback(port, "write_bytes")(prov, path, b"x")):
        with pytest.raises(port.FileError) as e:
            await call
        assert e.value.status == 400


async def test_links_planted_by_the_kernel_are_not_followed(port, prov, tmp_path):
    work = Path(prov.work_dir)
    os.symlink(tmp_path / "secret", work / "file-link")
    os.symlink(tmp_path, work / "dir-link")
    os.link(tmp_path / "secret", work / "hard-link")
    read, write = fallback(port, "read_bytes"), fallback(port, "write_bytes")
    for path in ("file-link", "dir-link/secret", "hard-link"):
        with pytest.raises(port.FileError) as e:
            await read(prov, path, 100)
        assert e.value.status == 400, path
    with pytest.raises(port.FileError):
        await write(prov, "dir-link/secret", b"owned")
    # Replacing a link replaces the link itself, never its target.
    await write(prov, "file-link", b"mine")
    assert (tmp_path / "secret").read_text() == "host secret"
    assert not (work / "file-link").is_symlink()


async def test_a_fifo_is_refused_without_blocking(port, prov):
    # Blocking would hang here until pytest's timeout: opened O_NONBLOCK, then refused.
    os.mkfifo(Path(prov.work_dir) / "pipe")
    with pytest.raises(port.FileError) as e:
        await fallback(port, "read_bytes")(prov, "pipe", 100)
    assert e.value.status == 400


async def test_sizes_are_bounded(port, prov):
    write, read = fallback(port, "write_bytes"), fallback(port, "read_bytes")
    with pytest.raises(port.FileError) as e:
        await write(prov, "big", b"x" * 1001)  # disk_limit=1000
    assert e.value.status == 413 and "disk_limit" in str(e.value)
    assert not os.listdir(prov.work_dir)
    await write(prov, "ok", b"x" * 1000)
    with pytest.raises(port.FileError) as e:
        await read(prov, "ok", 999)
    assert e.value.status == 413
    with pytest.raises(port.FileError) as e:
        await read(prov, "missing", 10)
    assert e.value.status == 404
