"""``python -m agent_backend [--host H] [--port P]`` (run from ``examples/``): the service.

``python -m agent_backend keys add|revoke|list ...``: its API keys (see keys.py).
"""

from __future__ import annotations

import argparse
import sys

import uvicorn


def main() -> None:
    if sys.argv[1:2] == ["keys"]:
        from .keys import main as keys_main

        sys.exit(keys_main(sys.argv[2:]))
    parser = argparse.ArgumentParser(prog="python -m agent_backend", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="default 8765")
    args = parser.parse_args()
    # One worker: the session map and the rate limiter live in this process.
    uvicorn.run("agent_backend.app:app", host=args.host, port=args.port, workers=1)


if __name__ == "__main__":
    main()
