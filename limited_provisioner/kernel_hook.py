"""The startup hook every limited IPython kernel runs, and the files it reads.

The provisioner writes the hook into the kernel dir (root-owned: the kernel can read it,
not change it) and loads it with ``--IPKernelApp.exec_files``; see :data:`IPYTHON_HOOK`.
The hook only *explains*: nothing it does, and nothing the kernel writes, is relied on
to enforce a limit (the proxy and the provisioner do that, see proxy.py).
"""

from __future__ import annotations

NOTICE_ENV = "LIMITED_PROVISIONER_NOTICE_FILE"
MEM_LIMIT_ENV = "LIMITED_PROVISIONER_MEM_LIMIT"
OUTPUT_LIMIT_ENV = "LIMITED_PROVISIONER_OUTPUT_LIMIT"

# Loaded into IPython kernels with ``--IPKernelApp.exec_files``. (1) When the provisioner
# interrupts an execution for exec_timeout it first writes the notice file ("<msg_id of
# the execution>\n<reason>"); the resulting KeyboardInterrupt of *that* execution becomes
# a TimeoutError whose text says why, in the cell's own output (a model driving the
# kernel only ever sees that text). A user's own interrupt of another cell stays a
# KeyboardInterrupt. (2) A MemoryError from the data rlimit names the memory limit.
# (3) It stops print() output past the output limit inside the kernel: the proxy
# enforces the limit on every kind of output anyway, but a print loop would otherwise
# buffer what the proxy is going to drop in the kernel's own memory until it hits its
# memory limit. Stdlib only, so it runs in any image; everything it defines is deleted
# from the user namespace.
IPYTHON_HOOK = '''\
def __limited_provisioner_hooks():
    import os
    import sys

    shell = get_ipython()  # noqa: F821
    if shell is None:
        return

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

    def timeout_notice():
        if not notice_file:
            return ""
        try:
            with open(notice_file) as f:
                msg_id, _, text = f.read(4096).partition("\\n")
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
    "mem_env": MEM_LIMIT_ENV,
    "output_env": OUTPUT_LIMIT_ENV,
}
