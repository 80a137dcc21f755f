"""What one execution produced, and its plain-text rendering with the in-band marker.

A model calling the service as a tool sees only text, so every result ends with one
line it can read and a program can match::

    [limited-provisioner status=<status>] <one sentence: what happened, whether state is kept>

Notices about the kernel that do not change the status (the session's previous kernel
was culled, a child process was OOM-killed) come just before it, one per line, as
``[limited-provisioner notice] ...``. The wording of these lines is part of the API
(README.md, "Statuses and the marker").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("ok", "error", "timeout", "oom_killed", "limit_refused")
MARKER = "[limited-provisioner status={status}]"
NOTICE = "[limited-provisioner notice]"
STATE_KEPT = "variables from earlier cells are kept"
STATE_LOST = "variables from earlier cells are gone"
FILES_KEPT = "files in its work dir are kept"
NEW_KERNEL = "this session's previous kernel was shut down"

# CSI sequences (colours, cursor moves) as IPython puts them into tracebacks.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


# What one execution may make the service hold (text kept for the answer). The proxy
# already caps a cell's output at the kernelspec's output_limit; this caps what the
# service keeps of it whatever that setting is, so one tenant's cell cannot exhaust the
# memory every other tenant's sessions share.
MAX_KEPT_BYTES = 2 * 1024 * 1024
TRUNCATED = "\n[limited-provisioner notice] output truncated: the service keeps at most {n} bytes per execution\n"


@dataclass
class Execution:
    """Outputs of one execute request, collected from IOPub in arrival order."""

    stdout: str = ""
    stderr: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    reply: dict[str, Any] | None = None
    kept: int = 0
    limit: int = MAX_KEPT_BYTES

    def handle(self, msg: dict[str, Any]) -> bool:
        """Take one IOPub message of this execution; True once the kernel is idle."""
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "status":
            return content.get("execution_state") == "idle"
        if self.kept >= self.limit:
            return False  # already truncated: nothing more is kept
        self.kept += len(json.dumps(content, default=str))
        if self.kept >= self.limit:
            self.chunks.append(TRUNCATED.format(n=self.limit))
            return False
        if kind == "stream":
            text = content.get("text", "")
            if content.get("name") == "stderr":
                self.stderr += text
            else:
                self.stdout += text
            self.chunks.append(text)
        elif kind in ("execute_result", "display_data"):
            data = content.get("data") or {}
            text = strip_ansi(data.get("text/plain", ""))
            output = {"output_type": kind, "text": text, "mime_types": sorted(data)}
            png = data.get("image/png")
            if isinstance(png, str) and png:
                # Jupyter sends images base64-encoded already (IPython wraps lines).
                output["png"] = "".join(png.split())
            self.outputs.append(output)
            others = [m for m in sorted(data) if m != "text/plain"]
            if text:
                self.chunks.append(text + "\n")
            elif others:
                self.chunks.append(f"<{', '.join(others)} output without a text form>\n")
            if "png" in output:
                self.chunks.append(
                    f"[image/png, {len(output['png']) * 3 // 4} bytes: base64 in "
                    f"outputs[{len(self.outputs) - 1}].png]\n"
                )
        elif kind == "error":
            traceback = [strip_ansi(line) for line in content.get("traceback") or []]
            self.outputs.append(
                {
                    "output_type": "error",
                    "ename": content.get("ename", ""),
                    "evalue": strip_ansi(content.get("evalue", "")),
                    "traceback": traceback,
                }
            )
            self.chunks.append(
                "\n".join(traceback) + "\n"
                if traceback
                else f"{content.get('ename')}: {content.get('evalue')}\n"
            )
        return False

    @property
    def error(self) -> dict[str, Any] | None:
        """The execution's error, from its error output or else its reply."""
        for out in self.outputs:
            if out["output_type"] == "error":
                return out
        content = (self.reply or {}).get("content") or {}
        if content.get("status") == "error":
            return {"ename": content.get("ename", ""), "evalue": content.get("evalue", "")}
        return None


def marker(status: str, sentence: str) -> str:
    return f"{MARKER.format(status=status)} {sentence}"


def render_text(chunks: list[str], notices: list[str], status: str, sentence: str) -> str:
    """Outputs in arrival order, then notices, then the marker line."""
    body = "".join(chunks)
    if body and not body.endswith("\n"):
        body += "\n"
    lines = [f"{NOTICE} {notice}" for notice in notices]
    return body + "".join(line + "\n" for line in lines) + marker(status, sentence)


def new_kernel_notice(ended: str | None, files_kept: bool) -> str:
    """The notice of a session whose kernel was culled and replaced by a new one
    (``ended``: why, if this process still knows; ``files_kept``: keep_files_for gave the
    new kernel the old one's files)."""
    why = f" ({ended})" if ended else ""
    if files_kept:
        return (f"{NEW_KERNEL}{why}; a new kernel was started: {STATE_LOST}, but "
                f"{FILES_KEPT}")
    return f"{NEW_KERNEL}{why}; a new kernel was started and {STATE_LOST}"


# -- the marker sentences, one per outcome ------------------------------------------


def ok_sentence() -> str:
    return f"the execution finished; {STATE_KEPT}."


def exception_sentence(ename: str, mem_limit: str | None) -> str:
    if ename == "MemoryError" and mem_limit:
        return (
            f"the code raised MemoryError (memory limit {mem_limit}); the kernel lives on "
            f"and {STATE_KEPT}."
        )
    return f"the code raised {ename or 'an error'}; the kernel lives on and {STATE_KEPT}."


def interrupted_sentence(reason: str) -> str:
    return f"{reason}; the kernel lives on and {STATE_KEPT}."


def timeout_restart_sentence(reason: str) -> str:
    return f"{reason}; {STATE_LOST}."


def oom_sentence(mem_limit: str | None, reason: str) -> str:
    limit = f" {mem_limit}" if mem_limit else ""
    return (
        f"the kernel exceeded its memory limit{limit} and was restarted; {STATE_LOST}. "
        f"({reason})"
    )


def lost_reply_sentence(reason: str) -> str:
    return f"{reason}; the kernel lives on and {STATE_KEPT}, but this execution's result is unknown."


def died_sentence(reason: str) -> str:
    return f"the kernel died ({reason}) and was restarted; {STATE_LOST}."


def closed_sentence(reason: str) -> str:
    return (
        f"the kernel stopped ({reason}) and the session's next execution starts a new one; "
        f"{STATE_LOST}."
    )


def refused_sentence(message: str) -> str:
    return f"nothing was executed: {message}"
