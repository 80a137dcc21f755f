"""Exception types raised by limited-provisioner.

Every error names the limit or setting involved and says how to fix it, because
the person reading it is usually a notebook user or an operator looking at a log.
"""

import errno as _errno

from traitlets import TraitError


class LimitConfigError(TraitError, ValueError):
    """A limit setting has a value we cannot enforce (bad unit, negative, too small).

    Subclasses ``TraitError`` so traitlets validation surfaces it unchanged, and
    ``ValueError`` so plain Python callers can catch it without importing traitlets.
    """


class KernelLimitError(RuntimeError):
    """A kernel start was refused because a cap (count, memory, disk, rate) is reached.

    ``limit`` is the name of the setting that refused the start, so callers (and the
    jupyter_server handler that maps this to HTTP 429) can report it precisely.
    """

    def __init__(self, message: str, *, limit: str = ""):
        super().__init__(message)
        self.limit = limit


class SandboxUnavailableError(RuntimeError):
    """A requested isolation mechanism cannot be provided on this host."""


class SandboxStartError(SandboxUnavailableError):
    """The kernel could not be started in its sandbox: setting the sandbox up failed, or
    the kernel exited before it opened its sockets (an interpreter that cannot import
    ipykernel there, say). Raised by the start itself, never by a restarter.

    ``reason`` says what failed in the words of whoever saw it (the launcher's message,
    e.g. "exec '/opt/env/bin/python' failed: ...", the container runtime's, the
    kernel's last output); everything reserved for the kernel was released before this
    was raised. A ``SandboxUnavailableError``: jupyter_server answers 503.
    """

    def __init__(self, message: str, *, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class WorkspaceError(SandboxStartError):
    """The kernel cannot work in the folder it was started for (workspace.py): missing,
    reached through an untrusted symlink, or closed to the kernel's uid. Not started."""


class KernelCommandError(SandboxStartError, OSError):
    """The kernelspec's command could not be executed (missing, not executable).

    Also the ``OSError`` that jupyter_client's ``LocalProvisioner`` raises for it (as
    :class:`KernelCommandNotFound`: a ``FileNotFoundError``), so clients that report
    "kernel command not found" from that exception keep doing so; ``errno`` is the
    exec's, the text the launcher's.
    """

    def __init__(self, message: str, *, reason: str = "", errno: int | None = None):
        SandboxStartError.__init__(self, message, reason=reason)
        self.errno = errno
        # str(e) is "[Errno 2] <message>", as for any OSError with an errno.
        self.strerror = message


class KernelCommandNotFound(KernelCommandError, FileNotFoundError):
    """The kernelspec's command does not exist where the kernel runs."""


class KernelCommandNotPermitted(KernelCommandError, PermissionError):
    """The kernelspec's command is not executable by the kernel's user."""


def kernel_command_error(message: str, *, reason: str, errno: int) -> KernelCommandError:
    """The :class:`KernelCommandError` subclass an exec's ``errno`` calls for."""
    cls = {
        _errno.ENOENT: KernelCommandNotFound,
        _errno.ENOTDIR: KernelCommandNotFound,
        _errno.EACCES: KernelCommandNotPermitted,
        _errno.EPERM: KernelCommandNotPermitted,
    }.get(errno, KernelCommandError)
    return cls(message, reason=reason, errno=errno)


class KernelEndedError(RuntimeError):
    """A (re)start was dropped because the kernel was shut down while it ran (a restart
    for exec_timeout while the server deleted the kernel, say). Nothing of it runs."""


class AdoptionError(RuntimeError):
    """A running kernel could not be re-adopted.

    ``reason`` says why, for callers that sort the cases: "unknown", "dead" (its
    leftovers were removed), "managed" (another live process manages it), "unreachable"
    (it was shut down rather than left running unmanaged).
    """

    def __init__(self, message: str, *, reason: str = ""):
        super().__init__(message)
        self.reason = reason
