"""``python -m mcp_server [--transport stdio|streamable-http] [--host H] [--port P]``
(with ``examples/`` on ``PYTHONPATH``, or run from it). The user is ``MCP_USER``; limits
and backend come from the same ``AGENT_BACKEND_*`` variables as the HTTP service."""

from __future__ import annotations

import argparse
import asyncio
import logging

from .server import serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mcp_server", description=__doc__)
    parser.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1",
                        help="streamable-http: default 127.0.0.1 (every caller acts as MCP_USER)")
    parser.add_argument("--port", type=int, default=8766, help="streamable-http: default 8766")
    args = parser.parse_args()
    # stderr only: over stdio, stdout is the protocol.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args.transport, args.host, args.port))


if __name__ == "__main__":
    main()
