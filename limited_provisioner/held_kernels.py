"""The kernels this process is starting or managing, and what happens to them at exit.

* Adoption in the same process leaves them alone: a server whose loop already runs
  adopts in the background while it starts kernels, and its own starting kernel is no
  orphan (:func:`holding`).
* A process that exits cleanly ends the kernels it still holds, as a stock kernel ends
  with its parent (ipykernel polls it; limited kernels do not, so that a *crashed*
  server's or agent's kernels can be re-adopted). A script, a test suite, nbclient in a
  notebook runner that forgets a shutdown leaves nothing running. ``detach()`` lets a
  kernel go first, for a later :func:`~limited_provisioner.adopt` (jupyter_server's
  ``keep_kernels_on_exit``, the agent backend's shutdown). A crashed process runs no exit
  handler: its kernels wait ``orphan_grace`` for adoption, then the reaper removes them.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import weakref
from typing import Any

from . import _background

log = logging.getLogger(__name__)

# How long a clean exit waits for its kernels to be ended.
EXIT_TIMEOUT = 30.0

_held: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()


def _key(prov: Any) -> tuple[str, str]:
    return str(prov.registry.state_dir), prov.kernel_id


def hold(prov: Any) -> None:
    """``prov`` starts or manages its kernel from this process."""
    _held[_key(prov)] = prov


def let_go(prov: Any) -> None:
    """``prov`` no longer does (its kernel ended, or it was detached)."""
    if _held.get(_key(prov)) is prov:
        del _held[_key(prov)]


def holding(state_dir: str | os.PathLike, kernel_id: str) -> bool:
    """Whether a provisioner of this process starts or manages that kernel."""
    return (str(state_dir), kernel_id) in _held


def _end_held_kernels() -> None:
    held = list(_held.values())
    if not held:
        return

    async def end_all() -> None:
        results = await asyncio.gather(
            *(prov.end_at_exit() for prov in held), return_exceptions=True
        )
        for prov, result in zip(held, results):
            if isinstance(result, BaseException):
                log.warning("Kernel %s: ending it at exit failed: %r", prov.kernel_id, result)

    try:
        _background.run(end_all()).result(timeout=EXIT_TIMEOUT)
    except Exception as e:  # exiting anyway: the reaper removes what is left
        log.warning("Ending %d limited kernel(s) at exit failed: %r", len(held), e)


def _forget_after_fork() -> None:
    # The parent's kernels are the parent's: a child's exit must never end them.
    _held.clear()


# Before concurrent.futures refuses new work at exit: ending a kernel runs blocking steps
# in threads. Its thread pools register their exit hook the same way when first imported,
# and these hooks run last-registered first: import it now, register after it.
import concurrent.futures.thread  # noqa: E402,F401

_register = getattr(threading, "_register_atexit", atexit.register)
_register(_end_held_kernels)
os.register_at_fork(after_in_child=_forget_after_fork)
