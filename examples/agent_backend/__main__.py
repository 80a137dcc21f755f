"""``python -m agent_backend [--host H] [--port P]`` (run from ``examples/``)."""

from __future__ import annotations

import argparse

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m agent_backend", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="default 8765")
    args = parser.parse_args()
    # One worker: the session map and the rate limiter live in this process.
    uvicorn.run("agent_backend.app:app", host=args.host, port=args.port, workers=1)


if __name__ == "__main__":
    main()
