"""What is one per host (or per server process), not one per kernel.

:class:`LimitedHost` holds the settings the server manager, the server extension, the
CLI and every kernel share — where the registry lives, which server this is, how often
orphans are reaped — and the process's one periodic reaper, which runs on the
package's loop (``_background.py``) whoever started it. Kernels read
their defaults from it; a kernelspec may still point one kernel elsewhere (an agent
backend keeps its own state dir and server id).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import socket
import threading
from typing import Any

from traitlets import Float, Unicode, default
from traitlets.config import Config, SingletonConfigurable
from traitlets.config.loader import DeferredConfig

from . import _background
from .logs import follow_parent_log, get_logger
from .reaper import ORPHAN_GRACE, reap_periodically
from .registry import STATE_DIR_ENV, Registry, default_state_dir
from .settings import HOST_SETTINGS

SERVER_ID_ENV = "LIMITED_PROVISIONER_SERVER_ID"
# Config sections that held these settings before they moved here; still read (with a
# deprecation warning) so existing jupyter_server_config.py files keep working.
LEGACY_SECTIONS = ("LimitedProvisionerMixin", "LimitedProcessProvisioner",
                   "LimitedDockerProvisioner")

log = logging.getLogger(__name__)


def default_server_id() -> str:
    """Stable across restarts of the same server: its hostname and Jupyter runtime dir."""
    from jupyter_core.paths import jupyter_runtime_dir

    seed = f"{socket.gethostname()}:{jupyter_runtime_dir()}"
    return hashlib.sha256(seed.encode()).hexdigest()[:12]


class LimitedHost(SingletonConfigurable):
    """Host-wide settings and the in-process orphan reaper."""

    @default("log")
    def _log_default(self) -> logging.Logger:
        follow_parent_log(self)  # the running application's log, if any (logs.py)
        return get_logger(__name__)

    state_dir = Unicode(
        "",
        help=f"""Directory holding the kernel registry, locks and per-kernel dirs, shared
        by every server of the host (caps count across them). Default (empty):
        ${STATE_DIR_ENV}, else /var/lib/limited-provisioner as root, else a dir in the
        Jupyter runtime dir.""",
    ).tag(config=True)

    server_id = Unicode(
        "",
        help=f"""Identity of this Jupyter server in the registry and on containers; stable
        across restarts of the same server, so a restarted server re-adopts its kernels.
        Default (empty): ${SERVER_ID_ENV}, else derived from hostname and runtime dir.""",
    ).tag(config=True)

    # The defaults are resolved at each use, not once per process: a script or bench that
    # points $LIMITED_PROVISIONER_STATE_DIR elsewhere between kernels gets what it asked.
    @property
    def resolved_state_dir(self) -> str:
        return self.state_dir or str(default_state_dir())

    @property
    def resolved_server_id(self) -> str:
        return self.server_id or os.environ.get(SERVER_ID_ENV) or default_server_id()

    reap_interval = Float(
        60.0,
        help="""Seconds between two runs of the in-server orphan reaper, which removes
        kernels left by servers that are gone once they died or their idle clock ran
        out. 0 disables (then run `limited-provisioner reap` from cron).""",
    ).tag(config=True)

    orphan_grace = Float(
        ORPHAN_GRACE,
        help=f"""Seconds a running kernel whose server (or script, or agent) is gone waits
        to be re-adopted before the reaper removes it, counted from when a reaper first
        sees it orphaned -- a crashed client's kernel then stops holding its mem_limit
        long before its idle_timeout; a swarm kernel's, from its server's last heartbeat
        in the swarm (any server of the swarm reaps it). Set it above the longest server
        restart or deploy (keep_kernels_on_exit). 0: kept until its idle_timeout or
        max_lifetime (swarm kernels: until their server is back). Default
        {ORPHAN_GRACE:g}.""",
    ).tag(config=True)

    def __init__(self, **kwargs: Any):
        config = kwargs.get("config")
        if config is None and kwargs.get("parent") is not None:
            config = kwargs["parent"].config
        legacy = _legacy_settings(config) if config is not None else {}
        for name, value in legacy.items():
            if isinstance(value, DeferredConfig):  # from the command line: still a string
                value = value.get_value(self.class_traits()[name])
            kwargs.setdefault(name, value)
        super().__init__(**kwargs)
        # Started from any thread (a kernel's start on the package loop, the server's
        # adoption on its own): one lock, one reaper. A "lasting" reaper is a server's,
        # which runs for its whole life, kernels or not (orphans of crashed peers still
        # need removing); a script's stops with its last kernel.
        self._reaper_lock = threading.Lock()
        self._reaper: concurrent.futures.Future | None = None
        self._reaper_pid = 0
        self._lasting = False

    @property
    def registry(self) -> Registry:
        return Registry(self.resolved_state_dir)

    def start_reaper(
        self, state_dir: str | None = None, interval: float | None = None, lasting: bool = False
    ) -> None:
        """The process's periodic reaper, on the package's loop (from any thread)."""
        interval = self.reap_interval if interval is None else interval
        if not interval:
            return
        with self._reaper_lock:
            self._lasting = self._lasting or lasting
            # A forked child inherits the parent's future, not the task behind it.
            running = self._reaper is not None and self._reaper_pid == os.getpid()
            if running and not self._reaper.done():
                return
            registry = Registry(state_dir or self.resolved_state_dir)
            self._reaper = _background.run(
                reap_periodically(registry, interval, self.log, self.orphan_grace)
            )
            self._reaper_pid = os.getpid()

    def stop_reaper(self) -> None:
        """Stop the reaper a script's kernels started (never a server's lasting one)."""
        with self._reaper_lock:
            if self._lasting or self._reaper is None:
                return
            reaper, self._reaper = self._reaper, None
        reaper.cancel()


def _legacy_settings(config: Config) -> dict[str, Any]:
    """Host settings still written in a provisioner's section (c.LimitedProvisionerMixin.*)."""
    found: dict[str, Any] = {}
    current = config["LimitedHost"] if config._has_section("LimitedHost") else {}
    for section in LEGACY_SECTIONS:
        if not config._has_section(section):
            continue
        for name in HOST_SETTINGS:
            if name in config[section] and name not in found and name not in current:
                found[name] = config[section][name]
                log.warning(
                    "c.%s.%s: host-wide settings belong in c.LimitedHost.%s (the server's "
                    "adoption and reaper read it there); using this value for now",
                    section, name, name,
                )
    return found
