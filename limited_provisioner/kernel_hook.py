"""The startup hook every limited IPython kernel runs: it explains the limits in the cell.

The provisioner writes this file's own source (:func:`hook_source`) into the kernel dir
(root-owned: the kernel can read it, not change it) and starts ipykernel with
``--IPKernelApp.exec_files=<that file>``; IPython runs it in the user namespace at kernel
start and the bootstrap at the end calls :func:`install`, then gives the namespace back
as it was. It only *explains*: the code in the kernel can undo all of it, so nothing it
does is relied on to enforce a limit (the proxy and the provisioner do that, proxy.py).

- A KeyboardInterrupt of the execution named in the notice file (``"<msg_id>\\n<text>"``,
  written by the provisioner before it interrupts that execution for exec_timeout)
  becomes a TimeoutError with that text, in the cell's own output: a model driving the
  kernel only ever sees that text. A user's own interrupt stays a KeyboardInterrupt.
- A MemoryError (the data rlimit refused an allocation) names the memory limit.
- Writing into a folder the kernel may only read (a root-owned notebook folder,
  workspace.py) says why, instead of a bare "Read-only file system".
- print() output past the output limit is dropped in the kernel itself: the proxy drops
  it anyway, but a print loop would otherwise fill the kernel's own memory with it.

It runs in any image, with any Python >= 3.8: stdlib only, nothing from this package.
"""

# exec_files runs this file in the user namespace: remember it, to give it back unchanged.
_USER_NS = dict(globals()) if __name__ == "__main__" else {}

import functools  # after _USER_NS: these names are the file's too
import os

NOTICE_ENV = "LIMITED_PROVISIONER_NOTICE_FILE"
MEM_LIMIT_ENV = "LIMITED_PROVISIONER_MEM_LIMIT"
OUTPUT_LIMIT_ENV = "LIMITED_PROVISIONER_OUTPUT_LIMIT"
READ_ONLY_FOLDER_ENV = "LIMITED_PROVISIONER_READ_ONLY_FOLDER"
EROFS = 30
NOTICE_MAX_BYTES = 4096


@functools.lru_cache(maxsize=None)  # noqa: UP033 (functools.cache: Python 3.9)
def hook_source() -> str:
    """This file's text: what the provisioner writes into the kernel dir."""
    with open(__file__, encoding="utf-8") as f:
        return f.read()


def install(shell, environ):
    """Explain the limits named in ``environ`` in ``shell``'s output (module docstring)."""
    import sys

    limit = int(environ.get(OUTPUT_LIMIT_ENV) or 0)
    notice_file = environ.get(NOTICE_ENV)
    mem_limit = environ.get(MEM_LIMIT_ENV)
    read_only_folder = environ.get(READ_ONLY_FOLDER_ENV)
    if limit:
        sent = {"bytes": 0, "noticed": False}

        def reset(*args):
            sent["bytes"] = 0
            sent["noticed"] = False

        shell.events.register("pre_execute", reset)

        def capped(original):
            def write(text):
                room = limit - sent["bytes"]
                sent["bytes"] += len(text)
                if len(text) <= room:
                    return original(text)
                if room > 0:
                    original(text[:room])
                if not sent["noticed"]:
                    sent["noticed"] = True
                    original(
                        f"\n[limited-provisioner] output limit of {limit} bytes reached: "
                        "the rest of this cell's output is dropped\n"
                    )
                return len(text)

            return write

        for stream in (sys.stdout, sys.stderr):
            stream.write = capped(stream.write)

    def timeout_notice():
        """The notice text, if the notice file names the execution running now."""
        if not notice_file:
            return ""
        try:
            with open(notice_file) as f:
                msg_id, _, text = f.read(NOTICE_MAX_BYTES).partition("\n")
        except OSError:
            return ""
        parent = getattr(shell, "parent_header", None) or {}
        current = (parent.get("header") or {}).get("msg_id", "")
        return text.strip() if msg_id and msg_id == current else ""

    replaced = []

    def explained(self, etype, evalue, tb, tb_offset=None):
        notice = timeout_notice() if etype is KeyboardInterrupt else ""
        if notice:
            error = TimeoutError(notice)
            replaced.append(error)
            self.showtraceback((TimeoutError, error, None), tb_offset=tb_offset)
        elif issubclass(etype, MemoryError) and mem_limit:
            # An allocation refused by the data rlimit: say which limit, or a user
            # (or a model) reads a bare "MemoryError" as a bug in their code.
            text = f"memory limit {mem_limit} reached (limited-provisioner)"
            if str(evalue):
                text += f": {evalue}"
            text += "; free memory (del large objects) or ask for a larger mem_limit"
            try:
                error = etype(text)
            except Exception:  # numpy's _ArrayMemoryError(shape, dtype) and the like
                etype, error = MemoryError, MemoryError(text)
            replaced.append(error)
            self.showtraceback((etype, error, tb), tb_offset=tb_offset)
        elif issubclass(etype, OSError) and evalue.errno == EROFS and read_only_folder:
            error = OSError(EROFS, f"{evalue.strerror} (limited-provisioner: this kernel may "
                            f"read but not write {read_only_folder})", evalue.filename)
            replaced.append(error)
            self.showtraceback((OSError, error, tb), tb_offset=tb_offset)
        else:
            self.showtraceback((etype, evalue, tb), tb_offset=tb_offset)

    explains = (KeyboardInterrupt, MemoryError) + ((OSError,) if read_only_folder else ())
    shell.set_custom_exc(explains, explained)

    def reply_with_explained_error(result):
        # The execute_reply's ename/evalue come from result.error_in_exec (what a
        # client like nbclient raises), not from the traceback shown: keep them equal.
        if replaced:
            result.error_in_exec = replaced.pop()
            del replaced[:]

    shell.events.register("post_run_cell", reply_with_explained_error)


def _give_back(namespace, before, shell):
    """Leave ``namespace`` as it was before this file ran in it (exec_files)."""
    for name in [name for name in namespace if name not in before]:
        del namespace[name]
    namespace.update(before)
    # Our docstring replaced the namespace's __doc__ before _USER_NS was taken: IPython's
    # is the one of a fresh user module.
    fresh = getattr(shell, "prepare_user_module", None)
    if fresh is not None:
        namespace["__doc__"] = fresh()[0].__doc__


# Run by IPython's exec_files (in the user namespace, __name__ "__main__"), not imported.
if __name__ == "__main__" and "get_ipython" in globals():
    try:
        # With its own copy of these globals, what install leaves running (at every write,
        # error and cell) outlives their removal below and ignores a user's "len = 3".
        type(install)(install.__code__, dict(globals()))(get_ipython(), os.environ)  # noqa: F821
    finally:
        _give_back(globals(), _USER_NS, get_ipython())  # noqa: F821
