"""Telling notebook users *why* their kernel died, in the cell that was running.

When a limit kills a kernel (OOM, pids, disk, an exec_timeout the code ignored), a stock
server only sends ``status: restarting`` and JupyterLab shows a generic "kernel died"
dialog. This connection first sends an IOPub ``error`` message whose parent is the
execution that was running, so the cell's output says which limit was exceeded, then
the usual status message. Enabled by the server extension (serverext.py).

It also tells a (re)connected client that the kernel is idle. JupyterLab ignores status
messages answering the requests it does not count as activity (the server's
``untracked_message_types``, e.g. ``kernel_info_request``), and after an automatic
restart those are all a reconnecting client gets: it showed "Starting" (or "Unknown")
until the next execution. The server itself normalizes its own state to "idle" on the
first such status after a start; this connection echoes that to the client, once.

And it turns Nagle's algorithm off on the WebSocket, which jupyter_server leaves on: every
reply that followed another small write waited for the client's delayed ACK (~40 ms).
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_client import protocol_version
from jupyter_client.jsonutil import json_default
from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

RESTARTED = "the kernel was restarted; variables and imports from earlier cells are gone"
DEAD = "the kernel could not be restarted; restart it from the Kernel menu"


def death_message(report: dict[str, Any], restarted: bool) -> dict[str, Any]:
    """IOPub ``error`` content for a kernel death described by ``death_report()``."""
    ename = "KernelDied" if report["kind"] == "exit" else "KernelLimitExceeded"
    evalue = f"{report['reason']}; {RESTARTED if restarted else DEAD}"
    return {
        "ename": ename,
        "evalue": evalue,
        "traceback": [f"\x1b[0;31m{ename}\x1b[0m: {evalue}"],
    }


class LimitedWebsocketConnection(ZMQChannelsWebsocketConnection):
    """ZMQChannelsWebsocketConnection that explains limit kills in the notebook and
    tells a reconnected client its kernel is idle."""

    # The client has no execution state it acts on yet: true from the connection's start
    # and from each restart until a status it counts, or our echo of one, went out.
    _state_owed = True

    def connect(self) -> Any:
        # A reply goes out as several small writes (busy, reply, idle): with Nagle's
        # algorithm on, the second waits for the client's delayed ACK, ~40 ms on Linux,
        # on every request of every notebook. Tornado leaves it on by default.
        try:
            self.websocket_handler.set_nodelay(True)
        except (AssertionError, OSError):  # closed already (tornado asserts), or no TCP
            self.log.debug("Kernel %s: could not set TCP_NODELAY", self.kernel_id)
        return super().connect()

    def on_kernel_restarted(self) -> None:
        self._explain_death(restarted=True)
        super().on_kernel_restarted()
        self._state_owed = True

    def handle_outgoing_message(self, stream: Any, outgoing_msg: list[Any]) -> None:
        super().handle_outgoing_message(stream, outgoing_msg)
        channel = stream if isinstance(stream, str) else getattr(stream, "channel", None)
        if channel == "iopub":
            try:
                self._settle_state(outgoing_msg)
            except Exception:  # the kernel's own messages went out; this is a courtesy
                self.log.exception("Kernel %s: could not echo its state", self.kernel_id)

    def _settle_state(self, msg_list: list[Any]) -> None:
        """After a status the client ignores (its parent is an untracked request) saying
        "idle", send the client a status it acts on: "idle" with no parent, as the server
        sends "restarting". Not while the server knows the kernel busy (a control
        request's status during another client's execution)."""
        _, parts = self.session.feed_identities(msg_list)
        unpack = self.session.unpack
        if unpack(parts[1]).get("msg_type") != "status":
            return
        state = unpack(parts[4]).get("execution_state")
        if state == "starting":
            # A new kernel process; the client now shows "Starting". The nudge's
            # kernel_info on control can be answered before the kernel publishes this
            # (ipykernel serves control from its own thread), so an echo may already
            # have gone out before it: owe one again.
            self._state_owed = True
            return
        if not self._state_owed:
            return
        parent_type = unpack(parts[2]).get("msg_type")
        if parent_type and self.multi_kernel_manager.track_message_type(parent_type):
            self._state_owed = False  # the client takes its state from this one
            return
        if state == "idle" and getattr(self.kernel_manager, "execution_state", "") != "busy":
            self._state_owed = False
            # Right after the kernel's own idle, unflushed: what is still queued on IOPub
            # (another execution's "busy") must come after it, not before.
            self._write_iopub(self.session.msg("status", {"execution_state": "idle"}),
                              flush=False)

    def on_restart_failed(self) -> None:
        self._explain_death(restarted=False)
        super().on_restart_failed()

    def _explain_death(self, restarted: bool) -> None:
        provisioner = getattr(self.kernel_manager, "provisioner", None)
        report = getattr(provisioner, "death_report", lambda: None)()
        if not report or report["parent"] is None:
            return  # died idle: there is no cell to write into; the status says enough
        try:
            parent = {
                **report["parent"],
                "msg_type": "execute_request",
                "username": self.session.username,
                "date": "",
                "version": protocol_version,
            }
            msg = self.session.msg("error", death_message(report, restarted), parent=parent)
            self._write_iopub(msg)
        except Exception:  # never let the explanation break the restart notification
            self.log.exception("Kernel %s: could not send the death reason", self.kernel_id)

    def _write_iopub(self, msg: dict[str, Any], flush: bool = True) -> None:
        # Same framing as ZMQChannelsWebsocketConnection._send_status_message, including
        # the flush: what the dead kernel sent before it died is delivered first.
        iopub = self.channels.get("iopub")
        if flush and iopub is not None and not iopub.closed():
            iopub.flush()
        if self.subprotocol == "v1.kernel.websocket.jupyter.org":
            self.write_message(serialize_msg_to_ws_v1(msg, "iopub", self.session.pack), binary=True)
        else:
            msg["channel"] = "iopub"
            self.write_message(json.dumps(msg, default=json_default))
