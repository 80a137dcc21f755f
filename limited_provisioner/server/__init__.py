"""jupyter_server integration: the kernel manager, the websocket, the server extension."""
