"""Canaries for the warm pool's hygiene check (tests/test_pool.py, bench/pool.py).

Each claimed kernel first looks for what an earlier tenant could have left — files in
its home, work dir, /tmp and /dev/shm, an environment variable, a Python global, a
process, the earlier tenant's home — then plants its own. The earlier tenant is kept
running until the next one has looked, so a leak between live neighbours counts too.
"""

from __future__ import annotations

import json
from typing import Any

CANARY_CODE = r"""
import glob as _g, json as _j, os as _o, subprocess as _sp, sys as _s
_seen = []
for _d in (_o.environ.get("HOME", "/nonexistent"), _o.getcwd(), "/tmp", "/dev/shm"):
    _seen += _g.glob(_o.path.join(_d, "lp-canary-*"))
if "LP_CANARY" in _o.environ:
    _seen.append("env LP_CANARY=" + _o.environ["LP_CANARY"])
if "LP_CANARY" in globals():
    _seen.append("global LP_CANARY=" + str(globals()["LP_CANARY"]))
for _p in _o.listdir("/proc"):
    if _p.isdigit():
        try:
            with open("/proc/%s/cmdline" % _p, "rb") as _f:
                if b"lp-canary-" in _f.read():
                    _seen.append("process " + _p)
        except OSError:
            pass
try:
    _seen += ["earlier home: " + _n for _n in _o.listdir(PREV_HOME) if "lp-canary" in _n]
except OSError:
    pass
for _d in (_o.environ["HOME"], "/tmp", "/dev/shm"):
    with open(_o.path.join(_d, "lp-canary-" + TAG), "w") as _f:
        _f.write(TAG)
_o.environ["LP_CANARY"] = TAG
globals()["LP_CANARY"] = TAG
_sp.Popen([_s.executable, "-c", "import time; time.sleep(3600)", "lp-canary-" + TAG],
          start_new_session=True, stdout=_sp.DEVNULL, stderr=_sp.DEVNULL)
print("CANARY" + _j.dumps({"seen": _seen, "home": _o.environ["HOME"], "uid": _o.getuid()}))
"""


def canary_code(tag: str, prev_home: str | None) -> str:
    return f"TAG = {tag!r}\nPREV_HOME = {prev_home or '/nonexistent'!r}\n" + CANARY_CODE


async def plant_and_check(kc: Any, tag: str, prev_home: str | None) -> dict[str, Any]:
    """Run the canary code in the kernel of ``kc``; what it saw, its home and uid."""
    out: list[str] = []

    def output(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append(f"ERROR {msg['content']['ename']}: {msg['content']['evalue']}")

    reply = await kc.execute_interactive(
        canary_code(tag, prev_home), output_hook=output, timeout=60
    )
    text = "".join(out)
    if reply["content"]["status"] != "ok" or "CANARY" not in text:
        raise RuntimeError(f"canary code failed: {text[-2000:]}")
    return json.loads(text.split("CANARY", 1)[1].strip().splitlines()[0])
