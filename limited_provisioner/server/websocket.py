"""Telling notebook users *why* their kernel died, in the cell that was running.

When a limit kills a kernel (OOM, pids, disk, an exec_timeout the code ignored), a stock
server only sends ``status: restarting`` and JupyterLab shows a generic "kernel died"
dialog. This connection first sends an IOPub ``error`` message whose parent is the
execution that was running, so the cell's output says which limit was exceeded, then
the usual status message. Enabled by the server extension (serverext.py).
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
    """ZMQChannelsWebsocketConnection that explains limit kills in the notebook."""

    def on_kernel_restarted(self) -> None:
        self._explain_death(restarted=True)
        super().on_kernel_restarted()

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

    def _write_iopub(self, msg: dict[str, Any]) -> None:
        # Same framing as ZMQChannelsWebsocketConnection._send_status_message, including
        # the flush: what the dead kernel sent before it died is delivered first.
        iopub = self.channels.get("iopub")
        if iopub is not None and not iopub.closed():
            iopub.flush()
        if self.subprotocol == "v1.kernel.websocket.jupyter.org":
            self.write_message(serialize_msg_to_ws_v1(msg, "iopub", self.session.pack), binary=True)
        else:
            msg["channel"] = "iopub"
            self.write_message(json.dumps(msg, default=json_default))
