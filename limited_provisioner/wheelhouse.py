"""An operator's wheelhouse: the packages a kernel without network may install.

The ``wheelhouse`` setting names a directory of wheels (filled with ``limited-provisioner
wheelhouse add``). Every kernel sees it read-only at the same path (process backend: the
host as the kernel's uid sees it; docker: bound read-only) and gets pip settings
(:func:`pip_env`) that install from it only, binary wheels only, into a directory of its
own HOME — within its own disk limit, importable in the running kernel at once (its
hook puts it on ``sys.path``, pip_hook.py). A directory only, not an index
URL: a kernel with ``network=false`` has no network to reach one, even on the host.

Nothing here is enforcement: what a kernel installs runs as the kernel, with its limits.
The wheelhouse must only not be a place where one kernel can plant code for the next:
a directory writable by every user, or by the kernels' uids, is refused.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import LimitConfigError
from .pip_hook import WHEELHOUSE_ENV, WHEELHOUSE_TARGET

# Wheel: name-version(-build)?-python-abi-platform.whl; sdist: name-version.tar.gz|.zip.
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")
_SDIST = re.compile(r"^(?P<name>.+)-(?P<version>\d[^-]*)\.(tar\.gz|zip|tar\.bz2)$")


def validate_setting(value: str) -> str:
    """The ``wheelhouse`` trait: "" (none) or an absolute directory path."""
    value = str(value or "").strip()
    if not value:
        return ""
    if "://" in value:
        msg = (
            f"wheelhouse={value!r}: give a directory, not a URL: a kernel with "
            f"network=false cannot reach an index, not even one on this host (fill a "
            f"directory with `limited-provisioner wheelhouse add PKG... --dir DIR`)"
        )
        raise LimitConfigError(msg)
    if not os.path.isabs(value):
        msg = f"wheelhouse={value!r} must be an absolute directory path"
        raise LimitConfigError(msg)
    return os.path.normpath(value)


def check_wheelhouse(path: str, kernel_uids: tuple[int, int] | None = None) -> None:
    """Raise :class:`LimitConfigError` unless ``path`` is a directory every kernel may
    read and none may write: readable and searchable by others, writable neither by
    every user nor (owner or group) by a kernel uid in ``kernel_uids`` (inclusive)."""
    try:
        st = os.stat(path)
    except OSError as e:
        msg = f"wheelhouse {path} cannot be used: {e.strerror}"
        raise LimitConfigError(msg) from None
    mode = stat.filemode(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        msg = f"wheelhouse {path} is not a directory"
        raise LimitConfigError(msg)
    if st.st_mode & 0o002:
        msg = (
            f"wheelhouse {path} is writable by every user (mode {mode}): a kernel could "
            f"plant packages there for the others; chmod o-w {path}"
        )
        raise LimitConfigError(msg)
    if kernel_uids is not None:
        low, high = kernel_uids
        owned = low <= st.st_uid <= high
        grouped = low <= st.st_gid <= high and st.st_mode & 0o020
        if owned or grouped:
            msg = (
                f"wheelhouse {path} belongs to kernel uid {st.st_uid} / gid {st.st_gid}: "
                f"that kernel could change what every other kernel installs; chown it "
                f"to the operator"
            )
            raise LimitConfigError(msg)
    if st.st_mode & 0o005 != 0o005:
        msg = (
            f"wheelhouse {path} is not readable by other users (mode {mode}), so kernels "
            f"running as their own uid cannot install from it; chmod -R o+rX {path}"
        )
        raise LimitConfigError(msg)


def target_dir(home: str) -> str:
    """Where a kernel whose HOME is ``home`` installs packages."""
    return os.path.join(home, WHEELHOUSE_TARGET)


def pip_env(path: str, home: str, network: bool = False) -> dict[str, str]:
    """The variables that point any pip the kernel runs at the wheelhouse (only, without
    ``network``: no index), wheels only (no sdist's build code runs), into
    ``target_dir(home)``."""
    return {
        WHEELHOUSE_ENV: path,
        **({} if network else {"PIP_NO_INDEX": "1"}),
        "PIP_FIND_LINKS": path,
        "PIP_ONLY_BINARY": ":all:",
        "PIP_TARGET": target_dir(home),
        # The kernel's disk: no second copy in a cache, no look for a newer pip.
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


@dataclass(frozen=True)
class Distribution:
    """One file of the wheelhouse."""

    file: str
    name: str  # normalized (PEP 503)
    version: str
    kind: str  # "wheel" or "sdist"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_filename(filename: str) -> Distribution | None:
    for kind, pattern in (("wheel", _WHEEL), ("sdist", _SDIST)):
        match = pattern.match(filename)
        if match:
            return Distribution(filename, normalize(match["name"]), match["version"], kind)
    return None


def list_wheelhouse(path: str) -> list[Distribution]:
    """The distributions in ``path``, by name and version."""
    found = [parse_filename(entry.name) for entry in os.scandir(path) if entry.is_file()]
    return sorted((d for d in found if d), key=lambda d: (d.name, d.version, d.file))


def download_command(
    packages: list[str],
    dest: str,
    *,
    python: str = sys.executable,
    python_version: str | None = None,
    platforms: list[str] | None = None,
) -> list[str]:
    """The operator's ``pip download`` that fills ``dest`` with wheels of ``packages``
    and their dependencies, for ``python``'s version and platform unless told others
    (``python_version`` "3.11", ``platforms`` ["manylinux2014_x86_64"]). pip itself is
    added: a kernel whose interpreter has none (the docker image) runs it from there."""
    cmd = [python, "-m", "pip", "download", "--only-binary=:all:", "--dest", dest]
    if python_version:
        cmd += ["--python-version", python_version]
    for platform in platforms or ():
        cmd += ["--platform", platform]
    return [*cmd, *packages, "pip"]


def make_readable(path: str) -> None:
    """Files of the wheelhouse readable by every kernel uid (pip keeps the umask's)."""
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            mode = entry.stat(follow_symlinks=False).st_mode
            os.chmod(entry.path, stat.S_IMODE(mode) | 0o444)
    Path(path).chmod(stat.S_IMODE(os.stat(path).st_mode) | 0o555)
