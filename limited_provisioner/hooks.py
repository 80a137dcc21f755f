"""The startup hook every limited IPython kernel runs, and the files it shares with us.

The provisioner passes the paths in environment variables (``*_ENV``) and loads the hook
with ``--IPKernelApp.exec_files``; see :data:`IPYTHON_HOOK` for what it does.
"""

from __future__ import annotations

NOTICE_ENV = "LIMITED_PROVISIONER_NOTICE_FILE"
OUTPUT_LIMIT_ENV = "LIMITED_PROVISIONER_OUTPUT_LIMIT"
EXEC_STATE_ENV = "LIMITED_PROVISIONER_EXEC_STATE_FILE"
MEM_LIMIT_ENV = "LIMITED_PROVISIONER_MEM_LIMIT"

# Loaded into IPython kernels with ``--IPKernelApp.exec_files``. (1) When the provisioner
# interrupts an execution for exec_timeout it first writes the notice file; this turns
# the resulting KeyboardInterrupt into a TimeoutError whose text says why, in the cell's
# own output (a model driving the kernel only ever sees that text). (2) It caps each
# execution's stdout/stderr at the output limit. (3) It records the running execution in
# the exec-state file from the kernel's main thread: code that holds the GIL in C (a
# catastrophic regex) starves ipykernel's IOPub thread, so "busy" may never be published,
# but the file is written before the user's code starts; it also names the execution a
# killed kernel was running, so the server can put the reason into that cell. (4) A
# MemoryError from the data rlimit names the memory limit. Stdlib only, so it runs in
# any image; everything it defines is deleted from the user namespace.
IPYTHON_HOOK = '''\
def __limited_provisioner_hooks():
    import os
    import sys

    shell = get_ipython()  # noqa: F821
    if shell is None:
        return
    state_file = os.environ.get("%(state_env)s")
    if state_file:
        import json
        import time

        def started(*args):
            parent = getattr(shell, "parent_header", None) or {}
            header = parent.get("header") or {}
            state = {
                "msg_id": header.get("msg_id", ""),
                "session": header.get("session", ""),
                "since": time.time(),
            }
            try:
                with open(state_file, "w") as f:
                    json.dump(state, f)
            except OSError:
                pass

        def finished(*args):
            try:
                os.unlink(state_file)
            except OSError:
                pass

        shell.events.register("pre_execute", started)
        shell.events.register("post_execute", finished)

    limit = int(os.environ.get("%(output_env)s") or 0)
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
                        "\\n[limited-provisioner] output limit of %%d bytes reached: the "
                        "rest of this cell's output is dropped\\n" %% limit
                    )
                return len(text)

            return write

        for stream in (sys.stdout, sys.stderr):
            stream.write = capped(stream.write)

    notice_file = os.environ.get("%(env)s")
    mem_limit = os.environ.get("%(mem_env)s")

    replaced = []

    def explained(self, etype, evalue, tb, tb_offset=None):
        notice = ""
        if etype is KeyboardInterrupt and notice_file:
            try:
                with open(notice_file) as f:
                    notice = f.read().strip()
                os.unlink(notice_file)
            except OSError:
                pass
        if notice:
            error = TimeoutError(notice)
            replaced.append(error)
            self.showtraceback((TimeoutError, error, None), tb_offset=tb_offset)
        elif issubclass(etype, MemoryError) and mem_limit:
            # An allocation refused by the data rlimit: say which limit, or a user
            # (or a model) reads a bare "MemoryError" as a bug in their code.
            text = "memory limit %%s reached (limited-provisioner)" %% mem_limit
            if str(evalue):
                text += ": %%s" %% evalue
            text += "; free memory (del large objects) or ask for a larger mem_limit"
            error = etype(text)
            replaced.append(error)
            self.showtraceback((etype, error, tb), tb_offset=tb_offset)
        else:
            self.showtraceback((etype, evalue, tb), tb_offset=tb_offset)

    shell.set_custom_exc((KeyboardInterrupt, MemoryError), explained)

    def reply_with_explained_error(result):
        # The execute_reply's ename/evalue come from result.error_in_exec (what a
        # client like nbclient raises), not from the traceback shown: keep them equal.
        if replaced:
            result.error_in_exec = replaced.pop()
            del replaced[:]

    shell.events.register("post_run_cell", reply_with_explained_error)


__limited_provisioner_hooks()
del __limited_provisioner_hooks
''' % {
    "env": NOTICE_ENV,
    "output_env": OUTPUT_LIMIT_ENV,
    "state_env": EXEC_STATE_ENV,
    "mem_env": MEM_LIMIT_ENV,
}
