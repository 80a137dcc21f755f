"""The startup hook of a limited IPython kernel with a wheelhouse (wheelhouse.py).

Written, like kernel_hook.py, into the kernel dir (root-owned: the kernel can read it,
not change it) and run by ipykernel's ``exec_files`` at kernel start, in the user
namespace, which it gives back as it was. It only helps: pip's settings (no index, wheels
only, the target dir) are in the kernel's environment, and nothing here enforces
anything (what the kernel installs runs as the kernel, with its limits).

- pip's target dir in the kernel's HOME is made and put first on ``sys.path`` (a venv
  has no user site) and on PYTHONPATH (for ``!python`` subprocesses): what ``%pip
  install`` puts there is importable in the running kernel at once.
- An interpreter without pip (the kernel image's) runs it from the wheelhouse's pip
  wheel (``python -m pip`` with the wheel on PYTHONPATH).
- A failed ``pip install`` (``%pip``, ``pip`` through automagic, ``!pip``) says which
  package the wheelhouse lacks, or has only as a source distribution, and who can add
  it: a model reads that, not pip's "No matching distribution found".

It runs in any image, with any Python >= 3.8: stdlib only, nothing from this package.
"""

# exec_files runs this file in the user namespace: remember it, to give it back unchanged.
_USER_NS = dict(globals()) if __name__ == "__main__" else {}

import functools  # after _USER_NS: these names are the file's too
import os

WHEELHOUSE_ENV = "LIMITED_PROVISIONER_WHEELHOUSE"
# Where pip installs from the wheelhouse, relative to the kernel's HOME (its PIP_TARGET).
WHEELHOUSE_TARGET = ".local/wheelhouse-packages"


@functools.lru_cache(maxsize=None)  # noqa: UP033 (functools.cache: Python 3.9)
def hook_source() -> str:
    """This file's text: what the provisioner writes into the kernel dir."""
    with open(__file__, encoding="utf-8") as f:
        return f.read()


def install(shell, environ):
    """Make pip's target dir importable now and in subprocesses, give pip to an
    interpreter that has none, and explain a ``pip install`` that failed (module doc)."""
    import re
    import shutil
    import sys
    from importlib import util as import_util

    wheelhouse, target = environ[WHEELHOUSE_ENV], environ["PIP_TARGET"]
    # pip builds the whole install in a temp dir first: on the kernel's disk, not in its
    # /tmp, whose tmpfs pages count against mem_limit (pandas: 160 MB).
    scratch = os.path.join(os.path.dirname(target), "pip-tmp")
    try:
        os.makedirs(target, exist_ok=True)
        os.makedirs(scratch, exist_ok=True)
    except OSError:
        return  # its HOME is not writable: pip will say so
    # A dir missing when the kernel started was cached as "nothing there".
    sys.path_importer_cache.pop(target, None)
    if target not in sys.path:
        sys.path.insert(0, target)
    paths = [target]
    if import_util.find_spec("pip") is None:
        # pip runs from its wheel (`python -m pip` with the wheel on PYTHONPATH).
        try:
            pips = sorted((n for n in os.listdir(wheelhouse)
                           if n.startswith("pip-") and n.endswith(".whl")),
                          key=lambda n: [int(p) if p.isdigit() else -1
                                         for p in n.split("-")[1].split(".")])
        except OSError:
            pips = []
        if pips:
            paths.append(os.path.join(wheelhouse, pips[-1]))
    if environ.get("PYTHONPATH"):
        paths.append(environ["PYTHONPATH"])
    environ["PYTHONPATH"] = os.pathsep.join(paths)

    install_line = re.compile(
        r"^\s*(?:%pip|!\s*pip3?|pip3?|!.*\s-m\s+pip)\s+install\s+(.*)$", re.MULTILINE
    )
    with_value = {"-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-t",
                  "--target", "-i", "--index-url", "--extra-index-url", "-f", "--find-links"}
    state = {"asked": [], "command": False}

    def asked(cell):
        names, skip = [], False
        for match in install_line.finditer(cell or ""):
            for word in match.group(1).split():
                if skip or word.startswith("-"):
                    skip = not skip and word in with_value
                    continue
                name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", word)
                if name and "/" not in word and not word.endswith(".whl"):
                    names.append(name.group(0))
        return names

    def before(info=None):  # IPython < 7 passes nothing
        cell = getattr(info, "raw_cell", "")
        state["asked"] = asked(cell)
        state["command"] = bool(re.search(r"^\s*!\s*pip3?\s", cell or "", re.MULTILINE))
        if state["asked"]:
            shell.user_ns["_exit_code"] = 0  # not an earlier cell's
            state["tmpdir"] = [environ.get("TMPDIR")]
            environ["TMPDIR"] = scratch

    def norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    def after(result=None):
        names, state["asked"] = state["asked"], []
        for old in state.pop("tmpdir", ()):
            if old is None:
                environ.pop("TMPDIR", None)
            else:
                environ["TMPDIR"] = old
        if not names or not shell.user_ns.get("_exit_code"):
            return
        if state["command"] and shutil.which("pip", path=environ.get("PATH")) is None:
            say([f"there is no pip command here: use %pip install {' '.join(names)}"])
            return
        try:
            files = os.listdir(wheelhouse)
        except OSError:
            files = []
        kinds = {}
        for file in files:
            kind = "wheel" if file.endswith(".whl") else "sdist"
            kinds.setdefault(norm(file.split("-")[0]), set()).add(kind)
        offline = " the kernel has no network." if environ.get("PIP_NO_INDEX") else ""
        lines = []
        for name in names:
            found = kinds.get(norm(name), set())
            if not found:
                lines.append(f"{name} is not in this sandbox's wheelhouse ({wheelhouse});"
                             f"{offline} Ask the operator to add it: "
                             f"limited-provisioner wheelhouse add {name}")
            elif "wheel" not in found:
                lines.append(f"{name} is only a source distribution in this sandbox's "
                             f"wheelhouse ({wheelhouse}): kernels install wheels only and "
                             f"never build one. Ask the operator for a wheel: "
                             f"limited-provisioner wheelhouse add {name}")
        if not lines:
            lines.append(f"pip could not install {' '.join(names)} from this sandbox's "
                         f"wheelhouse ({wheelhouse}): a dependency, or the version asked "
                         f"for, is not there as a wheel for this Python (pip's message "
                         f"above says which);{offline} Ask the operator to add it: "
                         f"limited-provisioner wheelhouse add {' '.join(names)}")
        say(lines)

    def say(lines):
        print("\n".join(f"[limited-provisioner] {line}" for line in lines), file=sys.stderr)

    shell.events.register("pre_run_cell", before)
    shell.events.register("post_run_cell", after)


def _give_back(namespace, before, shell):
    """Leave ``namespace`` as it was before this file ran in it (exec_files)."""
    for name in [name for name in namespace if name not in before]:
        del namespace[name]
    namespace.update(before)
    # Our docstring replaced the namespace's __doc__: IPython's is a fresh user module's.
    fresh = getattr(shell, "prepare_user_module", None)
    if fresh is not None:
        namespace["__doc__"] = fresh()[0].__doc__


# Run by IPython's exec_files (in the user namespace, __name__ "__main__"), not imported.
if __name__ == "__main__" and "get_ipython" in globals():
    try:
        if os.environ.get(WHEELHOUSE_ENV) and os.environ.get("PIP_TARGET"):
            # With its own copy of these globals, what install leaves running outlives
            # their removal below (as in kernel_hook.py).
            type(install)(install.__code__, dict(globals()))(get_ipython(), os.environ)  # noqa: F821
    finally:
        _give_back(globals(), _USER_NS, get_ipython())  # noqa: F821
