"""Parsing and validation of kernel limits, done once per kernel.

The provisioners declare their limit traits with the trait types defined here, so a
value from ``kernel.json`` (``metadata.kernel_provisioner.config``) and a value from
Jupyter config go through the same parser and produce the same error text.
:class:`Limits` is the immutable, already-parsed result every backend works from.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from traitlets import TraitType

from .errors import LimitConfigError

# A python kernel (ipykernel + IPython + zmq) needs about 60-70 MiB resident and
# ~100 MiB of private data mappings to reach its first ``kernel_info`` reply; below
# this it dies at import time with an opaque traceback, so refuse it up front.
MIN_MEM_LIMIT = 128 * 1024**2
# ipykernel opens ~40 descriptors (zmq sockets, eventfds, logs) before running code.
MIN_NOFILE_LIMIT = 64
# The kernel, its heartbeat/iopub/control threads and a shell child must fit.
MIN_PIDS_LIMIT = 8
# Enough for ipykernel's own files (history db, connection file rewrite).
MIN_DISK_LIMIT = 1024**2

# RLIMIT_DATA counts reserved-but-untouched private mappings (thread stacks, malloc
# arenas), not resident memory: an idle ipykernel has ~160M VmData for ~70M RSS (~200M
# / ~80M with numpy imported; measured on CPython 3.11, ipykernel 7). The cgroup is the
# hard limit; RLIMIT_DATA = mem_limit + this headroom makes a single runaway
# allocation fail as a catchable MemoryError close to the limit instead of an OOM kill.
DATA_RLIMIT_HEADROOM = 128 * 1024**2

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

SIZE_FORM = 'bytes as an integer or a string like "512M", "2G", "1.5GiB"'
CPU_FORM = 'a number of cores > 0 such as 0.5, 2 or "1.5"'
COUNT_FORM = "a positive integer"
DURATION_FORM = 'seconds as a number or a string like "90s", "30m", "1h"; 0 disables'


def format_size(num_bytes: int | None) -> str:
    """Render bytes the way users write them ("512M", "1.5G")."""
    if num_bytes is None:
        return "unlimited"
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if num_bytes >= factor:
            value = num_bytes / factor
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{num_bytes}B"


def parse_size(name: str, value: Any, minimum: int = 0) -> int | None:
    """Parse a size (bytes) setting; ``None`` means unlimited."""
    if value is None:
        return None
    if isinstance(value, bool):
        msg = f"{name}={value!r} is not a size: use {SIZE_FORM}, or null for unlimited"
        raise LimitConfigError(msg)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            msg = f"{name}={value!r} is not a size: use {SIZE_FORM}"
            raise LimitConfigError(msg)
        num_bytes = int(value)
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else None
        if not match or unit not in _SIZE_UNITS:
            msg = f"{name}={value!r} is not a size: use {SIZE_FORM}"
            raise LimitConfigError(msg)
        num_bytes = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        msg = f"{name}={value!r} is not a size: use {SIZE_FORM}"
        raise LimitConfigError(msg)
    if num_bytes <= 0:
        msg = f"{name}={value!r} must be positive: use {SIZE_FORM}, or null for unlimited"
        raise LimitConfigError(msg)
    if num_bytes < minimum:
        msg = (
            f"{name}={value!r} ({format_size(num_bytes)}) is below the {format_size(minimum)} "
            f"a kernel needs to start; raise {name} to at least {format_size(minimum)}"
        )
        raise LimitConfigError(msg)
    return num_bytes


def parse_cpu(name: str, value: Any) -> float | None:
    """Parse a CPU limit in cores; ``None`` means unlimited."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        cores = float(value)
    except (TypeError, ValueError):
        msg = f"{name}={value!r} is not a CPU amount: use {CPU_FORM}"
        raise LimitConfigError(msg) from None
    if not math.isfinite(cores) or cores <= 0:
        msg = f"{name}={value!r} must be greater than 0: use {CPU_FORM}, or null for unlimited"
        raise LimitConfigError(msg)
    if cores < 0.01:
        msg = f"{name}={value!r} is below the 0.01 cores the scheduler can enforce"
        raise LimitConfigError(msg)
    return cores


def parse_count(name: str, value: Any, minimum: int = 1) -> int | None:
    """Parse a positive integer count; ``None`` means unlimited."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        msg = f"{name}={value!r} is not a count: use {COUNT_FORM}"
        raise LimitConfigError(msg)
    try:
        count = int(value)
        if isinstance(value, float) and count != value:
            raise ValueError
    except ValueError:
        msg = f"{name}={value!r} is not a count: use {COUNT_FORM}"
        raise LimitConfigError(msg) from None
    if count < minimum:
        msg = f"{name}={value!r} is too small: use an integer >= {minimum}, or null for unlimited"
        raise LimitConfigError(msg)
    return count


def parse_duration(name: str, value: Any) -> float:
    """Parse a duration in seconds; 0 disables the timer."""
    if value is None:
        return 0.0
    if isinstance(value, bool):
        msg = f"{name}={value!r} is not a duration: use {DURATION_FORM}"
        raise LimitConfigError(msg)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        unit = match.group(2).lower() if match else None
        if not match or unit not in _DURATION_UNITS:
            msg = f"{name}={value!r} is not a duration: use {DURATION_FORM}"
            raise LimitConfigError(msg)
        seconds = float(match.group(1)) * _DURATION_UNITS[unit]
    else:
        msg = f"{name}={value!r} is not a duration: use {DURATION_FORM}"
        raise LimitConfigError(msg)
    if not math.isfinite(seconds) or seconds < 0:
        msg = f"{name}={value!r} must be >= 0: use {DURATION_FORM}"
        raise LimitConfigError(msg)
    return seconds


def parse_network(name: str, value: Any) -> bool:
    """Parse the network switch; accepts JSON booleans and their usual spellings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0", "none"):
        return False
    msg = f"{name}={value!r} is not a switch: use true (network allowed) or false (no network)"
    raise LimitConfigError(msg)


class _LimitTrait(TraitType):
    """Base for limit traits: the value is stored already parsed; ``minimum`` is the
    smallest value that can be enforced (sizes, counts)."""

    allow_none = True
    default_minimum = 0

    def __init__(self, default_value: Any = None, minimum: int | None = None, **kwargs: Any):
        self.minimum = self.default_minimum if minimum is None else minimum
        super().__init__(default_value=default_value, **kwargs)

    def parse(self, name: str, value: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, obj: Any, value: Any) -> Any:
        return self.parse(self.name, value)

    def from_string(self, s: str) -> Any:
        # Command-line / env config arrives as text; "None"/"null" means unlimited.
        if s.strip().lower() in ("none", "null", ""):
            return None
        return s


class ByteSize(_LimitTrait):
    """Bytes, given as an int or a "512M"-style string. ``None`` = unlimited."""

    info_text = SIZE_FORM

    def parse(self, name: str, value: Any) -> int | None:
        return parse_size(name, value, self.minimum)


class Cores(_LimitTrait):
    """CPU cores as a float. ``None`` = unlimited."""

    info_text = CPU_FORM

    def parse(self, name: str, value: Any) -> float | None:
        return parse_cpu(name, value)


class Count(_LimitTrait):
    """A positive integer. ``None`` = unlimited."""

    info_text = COUNT_FORM
    default_minimum = 1

    def parse(self, name: str, value: Any) -> int | None:
        return parse_count(name, value, self.minimum)


class Seconds(_LimitTrait):
    """A duration in seconds (float); 0 disables."""

    allow_none = False
    info_text = DURATION_FORM

    def parse(self, name: str, value: Any) -> float:
        return parse_duration(name, value)

    def from_string(self, s: str) -> Any:
        return s


class Switch(_LimitTrait):
    """A boolean that also accepts "true"/"false" strings from config files."""

    allow_none = False
    info_text = "true or false"

    def parse(self, name: str, value: Any) -> bool:
        return parse_network(name, value)

    def from_string(self, s: str) -> Any:
        return s


@dataclasses.dataclass(frozen=True)
class Limits:
    """The parsed limits of one kernel. ``None`` means "no limit of this kind"."""

    mem_limit: int | None = None
    cpu_limit: float | None = None
    pids_limit: int | None = None
    nofile_limit: int | None = None
    disk_limit: int | None = None
    files_limit: int | None = None
    network: bool = False
    exec_timeout: float = 0.0
    idle_timeout: float = 0.0

    @classmethod
    def from_config(cls, **values: Any) -> Limits:
        """Build from raw (unparsed) values, e.g. a dict read from JSON or a CLI."""
        return cls(
            mem_limit=parse_size("mem_limit", values.get("mem_limit"), MIN_MEM_LIMIT),
            cpu_limit=parse_cpu("cpu_limit", values.get("cpu_limit")),
            pids_limit=parse_count("pids_limit", values.get("pids_limit"), MIN_PIDS_LIMIT),
            nofile_limit=parse_count(
                "nofile_limit", values.get("nofile_limit"), MIN_NOFILE_LIMIT
            ),
            disk_limit=parse_size("disk_limit", values.get("disk_limit"), MIN_DISK_LIMIT),
            files_limit=parse_count("files_limit", values.get("files_limit"), 16),
            network=parse_network("network", values.get("network", False)),
            exec_timeout=parse_duration("exec_timeout", values.get("exec_timeout")),
            idle_timeout=parse_duration("idle_timeout", values.get("idle_timeout")),
        )

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """From an object whose traits (already parsed) carry the same names."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for logs: "mem 512M, cpu 1 core(s), pids 128, ..."."""
        parts = [
            f"mem {format_size(self.mem_limit)}",
            f"cpu {self.cpu_limit if self.cpu_limit is not None else 'unlimited'}",
            f"pids {self.pids_limit if self.pids_limit is not None else 'unlimited'}",
            f"nofile {self.nofile_limit if self.nofile_limit is not None else 'unlimited'}",
            f"disk {format_size(self.disk_limit)}",
            f"files {self.files_limit if self.files_limit is not None else 'unlimited'}",
            f"network {'on' if self.network else 'off'}",
        ]
        return ", ".join(parts)
