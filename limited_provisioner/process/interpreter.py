"""Where a kernel's Python interpreter keeps what it reads, found without running it.

The sandbox hides ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock`` behind private
tmpfs, and the kernel's uid cannot pass a directory other users cannot enter (a 0700
``/root``). An interpreter living there must be put back, read-only (sandbox.exposures):
this module lists what it needs, from the files Python itself reads at start-up.

* for each program of the kernel command (see ``_commands``), each hop of its symlink chain (a venv's ``bin/python`` links to its base
  interpreter) and the prefix around it (``<prefix>/bin/python``);
* a venv: the dir holding ``pyvenv.cfg`` (PEP 405), and its ``home`` (the base);
* a conda env: the dir holding ``conda-meta`` (a prefix like any other);
* what the ``.pth`` files of those prefixes' site-packages add to ``sys.path``: plain
  path lines and setuptools' editable finders (``MAPPING``), e.g. a project installed
  with ``pip install -e`` from ``/tmp/src``;
* every entry of the kernel's ``PYTHONPATH``.

Running the interpreter once to print ``sys.path`` would be exact but costs ~20 ms per
start; the layout says the same. The ``.pth`` scan is cached per site dir and its
modification time (installing or removing a package changes it).
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass

# setuptools' editable finder: ``MAPPING: dict[str, str] = {'pkg': '/src/pkg'}``.
_MAPPING = re.compile(r"^MAPPING\s*(?::[^=]*)?=\s*(\{.*?\})\s*$", re.MULTILINE | re.DOTALL)
_FINDER_IMPORT = re.compile(r"^import\s+([A-Za-z_][\w.]*)")


@dataclass(frozen=True)
class Needed:
    """A real path the kernel's interpreter reads.

    ``named_by`` is the uid of whoever chose it: 0 for the kernelspec, the environment
    and root-owned files, else the owner of the ``.pth`` file that lists it
    (sandbox.exposures trusts that less). ``required``: the interpreter cannot start
    without it (its dirs and prefixes); Python skips a missing ``sys.path`` entry.
    """

    path: str
    named_by: int = 0
    required: bool = False


def _resolve_command(argv0: str, env: Mapping[str, str]) -> str | None:
    if not argv0:
        return None
    if "/" in argv0:
        return os.path.abspath(argv0)
    return shutil.which(argv0, path=env.get("PATH", os.defpath))


def _symlink_hops(path: str) -> list[str]:
    """``path`` and each path its symlinks lead to, with real parent dirs: exec follows
    every hop, so each hop's dir must be visible."""
    hops: list[str] = []
    current = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    for _ in range(40):  # the kernel's own ELOOP limit
        hops.append(current)
        try:
            target = os.readlink(current)
        except OSError:
            break  # not a symlink (or gone: exec will say so)
        joined = os.path.join(os.path.dirname(current), target)
        current = os.path.join(
            os.path.realpath(os.path.dirname(joined)), os.path.basename(joined)
        )
    return hops


def _prefix_of(executable_dir: str) -> str:
    """``<prefix>`` for ``<prefix>/bin``; a dir that is no ``bin`` stands for itself."""
    if os.path.basename(executable_dir) in ("bin", "Scripts"):
        return os.path.dirname(executable_dir)
    return executable_dir


def _venv_home(prefix: str) -> str | None:
    """The ``home`` of a venv's ``pyvenv.cfg`` (its base interpreter's dir), if any."""
    try:
        with open(os.path.join(prefix, "pyvenv.cfg"), encoding="utf-8", errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "home" and value.strip():
            return value.strip()
    return None


def _prefixes(command: str) -> list[str]:
    """The install prefixes the interpreter at ``command`` runs from (venv and base)."""
    found: list[str] = []
    todo = [command]
    while todo:
        for hop in _symlink_hops(todo.pop()):
            prefix = _prefix_of(os.path.dirname(hop))
            if prefix in found:
                continue
            found.append(prefix)
            home = _venv_home(prefix)
            if home:
                # The base interpreter, as `home` names it (often a symlink itself).
                todo.append(os.path.join(home, os.path.basename(hop)))
                todo.append(os.path.join(home, "python3"))
    return [p for p in found if os.path.isdir(p)]


def _site_dirs(prefix: str) -> list[str]:
    return sorted(
        glob.glob(os.path.join(glob.escape(prefix), "lib*", "python*", "site-packages"))
        + glob.glob(os.path.join(glob.escape(prefix), "lib*", "python*", "dist-packages"))
    )


def _finder_paths(site_dir: str, module: str) -> list[str]:
    """The package dirs of a setuptools editable finder module (``MAPPING``)."""
    try:
        with open(os.path.join(site_dir, module + ".py"), encoding="utf-8") as f:
            match = _MAPPING.search(f.read(256 * 1024))
        mapping = ast.literal_eval(match.group(1)) if match else {}
    except (OSError, ValueError, SyntaxError):
        return []
    return [v for v in mapping.values() if isinstance(v, str)] if isinstance(mapping, dict) else []


@functools.lru_cache(maxsize=256)
def _pth_entries(site_dir: str, mtime_ns: int) -> tuple[Needed, ...]:
    """What the ``.pth`` files of ``site_dir`` add to ``sys.path``, as ``site`` reads them.

    Cached per ``mtime_ns`` of the dir: installing or removing a package adds or
    replaces files there, which changes it.
    """
    entries: list[Needed] = []
    try:
        names = sorted(n for n in os.listdir(site_dir) if n.endswith(".pth"))
    except OSError:
        return ()
    for name in names:
        pth = os.path.join(site_dir, name)
        try:
            st = os.stat(pth)
            with open(pth, encoding="utf-8", errors="replace") as f:
                lines = f.read(256 * 1024).splitlines()
        except OSError:
            continue
        owner = st.st_uid
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(("import ", "import\t")):
                module = _FINDER_IMPORT.match(line)
                if module and module.group(1).startswith("__editable__"):
                    paths = _finder_paths(site_dir, module.group(1))
                    entries.extend(Needed(p, owner) for p in paths)
                continue
            entries.append(Needed(os.path.join(site_dir, line), owner))
    return tuple(entries)


def _commands(cmd: list[str], env: Mapping[str, str]) -> dict[str, bool]:
    """The programs a kernel command may run, each with whether the kernel needs it:
    its ``argv[0]`` and any other argument that is an absolute path to an executable
    file (a wrapper like ``sh -c '...' python`` or ``env ... python``) are needed; the
    server's own interpreter, which kernelspecs usually name (jupyter_client puts it in
    place of a bare "python") and wrappers may find on PATH, is exposed if it can be."""
    found: dict[str, bool] = {}
    first = _resolve_command(cmd[0], env) if cmd else None
    if first:
        found[first] = True
    for arg in cmd[1:]:
        if os.path.isabs(arg) and os.path.isfile(arg) and os.access(arg, os.X_OK):
            found[arg] = True
    found.setdefault(sys.executable, False)
    return found


def interpreter_paths(cmd: list[str], env: Mapping[str, str]) -> list[Needed]:
    """What the kernel command ``cmd`` (with the kernel's ``env``) reads: real paths that
    exist, each once (see the module docstring)."""
    needed: list[Needed] = []
    for command, required in _commands(cmd, env).items():
        for hop in _symlink_hops(command):
            needed.append(Needed(os.path.dirname(hop), required=required))
        for prefix in _prefixes(command):
            needed.append(Needed(prefix, required=required))
            for site_dir in _site_dirs(prefix):
                try:
                    mtime = os.stat(site_dir).st_mtime_ns
                except OSError:
                    continue
                needed.extend(_pth_entries(site_dir, mtime))
    for entry in env.get("PYTHONPATH", "").split(os.pathsep):
        # Relative entries (and "", the cwd) are relative to the kernel's work dir.
        if os.path.isabs(entry):
            needed.append(Needed(entry))
    result: dict[str, Needed] = {}
    for item in needed:
        real = os.path.realpath(item.path)
        if not os.path.exists(real):
            continue
        known = result.get(real)
        if known is not None:  # the most trusted and most required of its namings
            item = Needed(real, min(known.named_by, item.named_by),
                          known.required or item.required)
        result[real] = Needed(real, item.named_by, item.required)
    return list(result.values())
