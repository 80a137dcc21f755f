"""The file tools' one door to a kernel's work dir: ``limited_provisioner.files``.

The package's :class:`~limited_provisioner.files.WorkDir` does the work the HTTP files API
does too (every path beneath the work dir's fd, no link followed, regular files only, no
blocking on a FIFO, sizes bounded by the kernel's ``disk_limit``); these coroutines only
take the kernel's provisioner (``km.provisioner``) and give the tools plain values::

    await list_files(provisioner) -> list[{"path": str, "size": int, "modified": float}]
    await read_bytes(provisioner, path, max_bytes) -> bytes
    await write_bytes(provisioner, path, data) -> None
    FileError (with .status: 400 bad path / not a regular file, 404 missing,
               409 no work dir of its own, 413 larger than max_bytes or disk_limit)
"""

from __future__ import annotations

from typing import Any

from limited_provisioner.files import FileError, WorkDir

IMPLEMENTATION = "limited_provisioner.files"

__all__ = ["IMPLEMENTATION", "FileError", "list_files", "read_bytes", "write_bytes"]


async def list_files(provisioner: Any) -> list[dict[str, Any]]:
    listing = await WorkDir.of(provisioner).list_files()
    return [info.to_dict() for info in listing.files]


async def read_bytes(provisioner: Any, path: str, max_bytes: int) -> bytes:
    return await WorkDir.of(provisioner).read_bytes(path, max_bytes)


async def write_bytes(provisioner: Any, path: str, data: bytes) -> None:
    await WorkDir.of(provisioner).write_bytes(path, data)
