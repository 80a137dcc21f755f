"""What clients asked of a kernel, and what the kernel may still send them.

The proxy (proxy.py) sees every message both ways; this module keeps the books it
decides by, kept from what clients sent (and when, by the server's clock), never from
what the kernel says about itself:

* :class:`Traffic`: the executions clients asked for and when (idle culling and
  exec_timeout rest on it, see lifecycle.py);
* :class:`Awaiting`: the requests still owed their one reply on shell and control;
* :class:`OutputBudget`: the output (IOPub, input requests) each execution may still
  send, charged to the execution clients know is running.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# Requests clients send by themselves on every (re)connect: answering them is not use.
# Counting them would let a client that reconnects more often than idle_timeout (a
# crash-looping agent service, a flapping browser tab) keep an abandoned kernel forever.
HOUSEKEEPING = frozenset({"kernel_info_request", "comm_info_request", "usage_request"})
# Requests on shell/control still waiting for their reply (one each), remembered per
# kernel; older ones are forgotten (a reply to them is then dropped).
MAX_AWAITING = 4096
# Counted on top of output_limit: message framing, and the notice the kernel's own hook
# prints when it stops a print loop at the same limit (kernel_hook.py).
FRAMING_ALLOWANCE = 64 * 1024
# What the cell is told when the proxy drops the kernel's output: once its execution's
# budget is spent, and for each message over max_message_size.
OUTPUT_NOTICE = (
    "\n[limited-provisioner] output limit of {limit} bytes reached: the rest of this "
    "cell's output is dropped\n"
)
OVERSIZE_NOTICE = (
    "\n[limited-provisioner] an output message of {size} bytes was dropped: larger than "
    "max_message_size ({limit} bytes)\n"
)


@dataclass
class Execution:
    """One execute_request a client sent: its ids, when it was sent, when it started."""

    msg_id: str
    session: str
    sent: float
    started: float | None = None

    def parent_header(self) -> dict[str, Any]:
        """The parent header a notice for this execution carries (clients route output
        by it)."""
        return {
            "msg_id": self.msg_id,
            "session": self.session,
            "msg_type": "execute_request",
            "username": "",
            "date": "",
            "version": "5.3",
        }


class Traffic:
    """What clients asked of one kernel and what it answered, by the server's clock.

    ``last_activity`` moves on a client's request (housekeeping excluded) and on the
    reply that ends an execution; the kernel's own output never moves it. An execution
    runs from the later of its request and the previous execution's reply until its own
    reply: requests queue in the kernel and run one at a time.
    """

    def __init__(self, last_activity: float | None = None):
        self.last_activity = last_activity or time.time()
        self._pending: list[Execution] = []
        self.last_execution: Execution | None = None

    def request(self, msg_type: str, header: dict[str, Any], now: float | None = None) -> None:
        now = now or time.time()
        if msg_type in HOUSEKEEPING:
            return
        self.last_activity = now
        if msg_type == "execute_request":
            msg_id, session = str(header.get("msg_id", "")), str(header.get("session", ""))
            execution = Execution(msg_id, session, now)
            if not self._pending:
                execution.started = now
            self._pending.append(execution)
            self.last_execution = execution

    def reply(self, msg_type: str, parent_id: str, now: float | None = None) -> None:
        """A verified execute_reply: ends the execution it answers (if it is pending)."""
        if msg_type != "execute_reply":
            return
        now = now or time.time()
        for i, execution in enumerate(self._pending):
            if execution.msg_id == parent_id:
                del self._pending[i]
                self.last_activity = now
                if self._pending and self._pending[0].started is None:
                    self._pending[0].started = now
                return

    def reset(self) -> None:
        """The kernel process is gone: nothing it was asked is running any more."""
        self._pending.clear()

    def running(self) -> Execution | None:
        return self._pending[0] if self._pending else None

    def charged(self) -> Execution | None:
        """The execution output is charged to: the running one, else the last one (its
        reply can overtake its output: they come on different sockets)."""
        return self.running() or self.last_execution

    @property
    def executing(self) -> str | None:
        running = self.running()
        return running.msg_id if running else None

    @property
    def executing_since(self) -> float | None:
        running = self.running()
        return running.started if running else None

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since the last activity; 0 while an execution is pending."""
        if self.busy:
            return 0.0
        return max(0.0, (now or time.time()) - self.last_activity)

    def execution_running_for(self, now: float | None = None) -> float:
        since = self.executing_since
        if since is None:
            return 0.0
        return (now or time.time()) - since


class Awaiting:
    """Requests clients sent on shell or control that the kernel has not answered yet.

    The kernel may send one reply to each, and nothing else on those channels: a reply
    it makes up, or a second one, reaches no client. Only the newest
    :data:`MAX_AWAITING` requests are remembered.
    """

    def __init__(self) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, msg_id: str) -> None:
        self._ids[msg_id] = None
        while len(self._ids) > MAX_AWAITING:
            self._ids.popitem(last=False)

    def take(self, msg_id: str) -> bool:
        """Whether a reply to ``msg_id`` may pass; it is then no longer awaited."""
        if msg_id not in self._ids:
            return False
        del self._ids[msg_id]
        return True


class OutputBudget:
    """Bytes of IOPub output per execution; past the limit, one notice and then nothing.

    The execution is the one the proxy knows is running (from the clients' requests),
    never the parent the kernel writes into its messages: a kernel that makes up a new
    parent per message must not get a new budget per message. Output while nothing runs
    (a background thread of a finished cell) counts against the last execution's."""

    def __init__(self, limit: int | None, remember: int = 64):
        self.limit = limit
        self._cap = limit + FRAMING_ALLOWANCE if limit else 0
        self._used: OrderedDict[str, int] = OrderedDict()
        self._remember = remember

    def admit(self, execution: Execution | None, size: int) -> str:
        """Charge ``size`` bytes to ``execution`` (None: output before any execution):
        "pass", "notice" (first refusal: tell the cell) or "drop"."""
        if not self._cap:
            return "pass"
        key = execution.msg_id if execution else ""
        used = self._used.pop(key, 0)
        self._used[key] = used + size
        while len(self._used) > self._remember:
            self._used.popitem(last=False)
        if used + size <= self._cap:
            return "pass"
        return "notice" if used <= self._cap else "drop"
