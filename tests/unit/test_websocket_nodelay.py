"""The kernel WebSocket turns Nagle's algorithm off before it connects: otherwise each
reply that follows another small write (busy, reply, idle) waits for the browser's
delayed ACK, ~40 ms on Linux, on every request of every notebook."""

from __future__ import annotations

from typing import Any

from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

from limited_provisioner.server.websocket import LimitedWebsocketConnection


class RecordingHandler:
    def __init__(self, fail: bool = False) -> None:
        self.nodelay: list[bool] = []
        self.fail = fail

    def set_nodelay(self, value: bool) -> None:
        if self.fail:
            raise OSError(9, "Bad file descriptor")
        self.nodelay.append(value)


def connection(handler: RecordingHandler) -> Any:
    conn = LimitedWebsocketConnection.__new__(LimitedWebsocketConnection)
    conn.__dict__.update(websocket_handler=handler)
    return conn


def test_nodelay_is_set_before_the_connection_is_made(monkeypatch):
    handler, order = RecordingHandler(), []

    def connect(self):
        order.append(list(handler.nodelay))
        return "connected"

    monkeypatch.setattr(ZMQChannelsWebsocketConnection, "connect", connect)
    monkeypatch.setattr(LimitedWebsocketConnection, "websocket_handler", None, raising=False)
    conn = connection(handler)
    assert conn.connect() == "connected"
    assert order == [[True]]


def test_a_transport_that_refuses_nodelay_still_connects(monkeypatch):
    monkeypatch.setattr(ZMQChannelsWebsocketConnection, "connect", lambda self: "connected")
    monkeypatch.setattr(LimitedWebsocketConnection, "websocket_handler", None, raising=False)
    monkeypatch.setattr(LimitedWebsocketConnection, "log", _Log(), raising=False)
    monkeypatch.setattr(LimitedWebsocketConnection, "kernel_id", "k", raising=False)
    assert connection(RecordingHandler(fail=True)).connect() == "connected"


class _Log:
    def debug(self, *args: Any) -> None:
        pass
