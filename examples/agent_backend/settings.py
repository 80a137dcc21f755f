"""The service's settings, read once from ``AGENT_BACKEND_*`` environment variables.

Limits are passed to the provisioner as strings/numbers exactly as given; it validates
them (``mem_limit='12 parsecs'`` is refused at the first kernel start with a message
naming the setting), so this module only parses what the service itself uses.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "AGENT_BACKEND_"
BACKENDS = {"process": "limited-process-provisioner", "docker": "limited-docker-provisioner"}


def _env(name: str, default: str | None) -> str | None:
    value = os.environ.get(PREFIX + name)
    return default if value is None or value == "" else value


def _count(name: str, default: int | None) -> int | None:
    value = _env(name, None)
    if value is None:
        return default
    if value.lower() in ("none", "null", "off"):
        return None
    try:
        return int(value)
    except ValueError:
        msg = f"{PREFIX}{name}={value!r} is not a count: use an integer, or 'none' for no cap"
        raise ValueError(msg) from None


def _default_state_dir() -> str:
    from limited_provisioner.registry import default_state_dir

    return str(default_state_dir())


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with the defaults documented in README.md."""

    backend: str = "process"
    state_dir: str = field(default_factory=_default_state_dir)
    server_id: str = ""
    kernel_name: str = "agent-python"
    # The process backend's kernel interpreter: a venv with the packages the agent may
    # use, anywhere (under /tmp, behind a 0700 dir: the sandbox exposes it read-only).
    kernel_python: str = sys.executable
    image: str | None = None
    mem_limit: str = "512M"
    cpu_limit: str = "1"
    pids_limit: str = "64"
    disk_limit: str = "1G"
    network: bool = False
    exec_timeout: str = "30s"
    exec_timeout_grace: str = "5"
    idle_timeout: str = "1h"
    # An idle-culled session's files wait this long for it to come back (0: deleted).
    keep_files_for: str = "1h"
    max_kernels: int | None = 20
    max_kernels_per_user: int | None = 3
    # Kernels kept started for the next sessions to claim (limited_provisioner's pool).
    pool_size: int = 0
    rate_limit: int = 5
    reply_ceiling: float = 600.0
    # A directory of wheels the kernels may pip-install from without network.
    wheelhouse: str = ""
    extra_config: dict[str, Any] = field(default_factory=dict)
    # Who is calling (auth.py): API keys from this file (default
    # <state_dir>/agent-backend-keys.json), or X-User as given behind a trusted proxy.
    keys_file: str = ""
    trust_x_user: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            msg = f"{PREFIX}BACKEND={self.backend!r}: use one of {sorted(BACKENDS)}"
            raise ValueError(msg)
        if self.trust_x_user and self.keys_file:
            msg = (f"{PREFIX}TRUST_X_USER and {PREFIX}KEYS_FILE are both set: X-User "
                   "from a trusted proxy, or API keys from the keys file, not both")
            raise ValueError(msg)
        if not self.server_id:
            default = os.environ.get("LIMITED_PROVISIONER_SERVER_ID") or (
                f"agent-backend-{socket.gethostname()}"
            )
            object.__setattr__(self, "server_id", default)

    @classmethod
    def from_env(cls) -> Settings:
        defaults = cls()
        return cls(
            backend=_env("BACKEND", defaults.backend),
            state_dir=_env("STATE_DIR", None)
            or os.environ.get("LIMITED_PROVISIONER_STATE_DIR")
            or defaults.state_dir,
            server_id=_env("SERVER_ID", "") or "",
            kernel_name=_env("KERNEL_NAME", defaults.kernel_name),
            kernel_python=_env("KERNEL_PYTHON", defaults.kernel_python),
            image=_env("IMAGE", None),
            mem_limit=_env("MEM_LIMIT", defaults.mem_limit),
            cpu_limit=_env("CPU_LIMIT", defaults.cpu_limit),
            pids_limit=_env("PIDS_LIMIT", defaults.pids_limit),
            disk_limit=_env("DISK_LIMIT", defaults.disk_limit),
            network=(_env("NETWORK", "false") or "").lower() in ("1", "true", "yes"),
            exec_timeout=_env("EXEC_TIMEOUT", defaults.exec_timeout),
            exec_timeout_grace=_env("EXEC_TIMEOUT_GRACE", defaults.exec_timeout_grace),
            idle_timeout=_env("IDLE_TIMEOUT", defaults.idle_timeout),
            keep_files_for=_env("KEEP_FILES_FOR", defaults.keep_files_for),
            max_kernels=_count("MAX_KERNELS", defaults.max_kernels),
            max_kernels_per_user=_count("MAX_KERNELS_PER_USER", defaults.max_kernels_per_user),
            pool_size=_count("POOL_SIZE", defaults.pool_size) or 0,
            rate_limit=_count("RATE_LIMIT", defaults.rate_limit) or 0,
            reply_ceiling=float(_env("REPLY_CEILING", str(defaults.reply_ceiling))),
            keys_file=_env("KEYS_FILE", "") or "",
            trust_x_user=(_env("TRUST_X_USER", "false") or "").lower() in ("1", "true", "yes"),
            wheelhouse=_env("WHEELHOUSE", "") or "",
        )

    @property
    def provisioner_name(self) -> str:
        return BACKENDS[self.backend]

    @property
    def keys_path(self) -> str:
        """The API keys file (keys.py): ``keys_file``, else in the state dir."""
        return self.keys_file or str(Path(self.state_dir) / "agent-backend-keys.json")

    @property
    def kernelspec_dir(self) -> Path:
        """The service's own kernelspec dir (no global `jupyter kernelspec install`)."""
        return Path(self.state_dir) / "agent-backend-kernelspecs"

    def provisioner_config(self) -> dict[str, Any]:
        """``metadata.kernel_provisioner.config`` of the service's kernelspec."""
        config: dict[str, Any] = {
            "mem_limit": self.mem_limit,
            "cpu_limit": self.cpu_limit,
            "pids_limit": self.pids_limit,
            "disk_limit": self.disk_limit,
            "network": self.network,
            "exec_timeout": self.exec_timeout,
            "exec_timeout_grace": self.exec_timeout_grace,
            "idle_timeout": self.idle_timeout,
            "keep_files_for": self.keep_files_for,
            "max_kernels": self.max_kernels,
            "max_kernels_per_user": self.max_kernels_per_user,
            "pool_size": self.pool_size,
            # The service authenticates its callers and names the owner of each kernel
            # in start_kernel(env=...), so per-user caps count per caller.
            "allow_owner_from_start_env": True,
            "state_dir": self.state_dir,
            "server_id": self.server_id,
        }
        if self.backend == "docker" and self.image:
            config["image"] = self.image
        if self.wheelhouse:
            config["wheelhouse"] = self.wheelhouse
        config.update(self.extra_config)
        return config

    def adoption_config(self) -> dict[str, Any]:
        """Provisioner settings for re-adopted kernels that their registry entry lacks.

        ``adopt()`` restores limits, owner and labels from the registry; the rest of the
        kernelspec config (caps, grace, identity) is handed over here.
        """
        from limited_provisioner.recovery import TRAIT_KEYS

        restored = {*TRAIT_KEYS, "owner", "max_lifetime", "labels", "state_dir"}
        return {k: v for k, v in self.provisioner_config().items() if k not in restored}

    def kernel_argv(self) -> list[str]:
        if self.backend == "docker":
            # The command inside the image: its own interpreter.
            return ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return [self.kernel_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
