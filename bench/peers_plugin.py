"""pytest plugin for bench/peers.py: runs a peer project's test suite (nbclient,
jupyter_server, jupyter_client) with every native kernel resolved to a limited kernelspec,
and records what it did so the harness can check that the limited kernels really ran.

Loaded into the peers' pytest with ``-p peers_plugin`` (bench/peers.py puts a directory
holding only this module on PYTHONPATH). Configured by environment variables:

``PEERS_BACKEND``    ``process`` or ``docker``: wrap kernelspecs; empty: stock kernels
                     (nothing patched, only recorded).
``PEERS_RECORD``     JSON-lines file this appends to: one line per wrapped kernelspec
                     lookup, per provisioner created, per kernel launched, per test result.
``PEERS_MEM_LIMIT``  the limited kernels' mem_limit (default ``1G``).
``PEERS_IMAGE``      the docker backend's image (default ``$LIMITED_PROVISIONER_TEST_IMAGE``,
                     else ``limited-provisioner-kernel:latest``).

In limited mode jupyter_server also gets this package's server extension, as ``pip
install`` enables it (patch_server_extension).

The peers' fixtures point JUPYTER_PATH, HOME etc. at fresh tmp dirs, so a limited
kernelspec installed on disk would never be found: the kernelspec manager is patched
instead, which is also what jupyter_server's kernelspec API and MappingKernelManager see.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from typing import Any

PROVISIONERS = {"process": "limited-process-provisioner", "docker": "limited-docker-provisioner"}
# The image's interpreter, not the host's: the docker provisioner runs the kernelspec
# argv as is inside the container (what `limited-provisioner install --backend docker`
# writes).
CONTAINER_KERNEL_ARGV = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]

BACKEND = os.environ.get("PEERS_BACKEND", "")
RECORD = os.environ.get("PEERS_RECORD", "")
MEM_LIMIT = os.environ.get("PEERS_MEM_LIMIT", "1G")
IMAGE = (os.environ.get("PEERS_IMAGE") or os.environ.get("LIMITED_PROVISIONER_TEST_IMAGE")
         or os.environ.get("LP_KERNEL_IMAGE") or "limited-provisioner-kernel:latest")


def record(event: str, **fields: Any) -> None:
    if not RECORD:
        return
    line = json.dumps({"event": event, "t": round(time.time(), 3), **fields}, default=str)
    # One write per line (O_APPEND): a kernel restarted from a thread cannot interleave.
    with open(RECORD, "a") as f:
        f.write(line + "\n")


def is_ipykernel(argv: list[str]) -> bool:
    return any(a in ("ipykernel_launcher", "ipykernel") or a.startswith("ipykernel.")
               for a in argv)


def is_python(spec: Any) -> bool:
    """A python kernel: by its language, or by its interpreter (jupyter_client's test
    kernels -- signalkernel, problemkernel -- name no language)."""
    argv0 = os.path.basename(spec.argv[0]) if spec.argv else ""
    return (spec.language or "").lower() == "python" or re.fullmatch(
        r"python[0-9.]*", argv0) is not None


def provisioner_registered(name: str) -> bool:
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    try:
        return KernelProvisionerFactory.instance()._check_availability(name)
    except Exception:  # a factory a test replaced entirely
        return False


def limit(spec: Any, kernel_name: str) -> Any:
    """``spec`` turned into a limited kernelspec, in place, if it is a python kernel
    without a provisioner of its own; returns it."""
    metadata = dict(spec.metadata or {})
    argv = list(spec.argv)
    if "kernel_provisioner" in metadata:
        return spec
    if not is_python(spec):
        record("not-wrapped", kernel_name=kernel_name, argv=argv, why="not a python kernel")
        return spec
    if not provisioner_registered(PROVISIONERS[BACKEND]):
        # The test mocks jupyter_client's provisioner entry points (test_provisioning.py)
        # and asserts what its own factory does with a spec that names none.
        record("not-wrapped", kernel_name=kernel_name, argv=argv,
               why="the test's provisioner factory does not know ours")
        return spec
    config: dict[str, Any] = {"mem_limit": MEM_LIMIT}
    if BACKEND == "docker":
        # Only ipykernel exists in the image; a test's own kernel module (jupyter_client's
        # signalkernel, problemkernel) would not: those stay stock, and are recorded so.
        if not is_ipykernel(argv):
            record("not-wrapped", kernel_name=kernel_name, argv=argv,
                   why="not ipykernel: not in the image")
            return spec
        config["image"] = IMAGE
        spec.argv = list(CONTAINER_KERNEL_ARGV)
    metadata["kernel_provisioner"] = {"provisioner_name": PROVISIONERS[BACKEND],
                                      "config": config}
    spec.metadata = metadata
    record("wrapped", kernel_name=kernel_name, argv=argv, backend=BACKEND)
    return spec


def patch_kernelspec_manager() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    # Both: get_all_specs() of the base class goes through _get_kernel_spec_by_name,
    # a subclass may override either. limit() is idempotent (it skips a spec that has a
    # provisioner), so a lookup passing through both is wrapped once.
    by_name = KernelSpecManager._get_kernel_spec_by_name
    get = KernelSpecManager.get_kernel_spec

    @functools.wraps(by_name)
    def _get_kernel_spec_by_name(self, kernel_name, resource_dir):
        return limit(by_name(self, kernel_name, resource_dir), kernel_name)

    @functools.wraps(get)
    def get_kernel_spec(self, kernel_name):
        return limit(get(self, kernel_name), kernel_name)

    KernelSpecManager._get_kernel_spec_by_name = _get_kernel_spec_by_name
    KernelSpecManager.get_kernel_spec = get_kernel_spec


def patch_recording() -> None:
    """Record every provisioner created and every kernel launched, with its class: the
    harness's proof that limited mode started limited kernels (and stock mode stock ones)."""
    from jupyter_client.manager import KernelManager
    from jupyter_client.provisioning.factory import KernelProvisionerFactory

    create = KernelProvisionerFactory.create_provisioner_instance

    @functools.wraps(create)
    def create_provisioner_instance(self, kernel_id, kernel_spec, parent):
        provisioner = create(self, kernel_id, kernel_spec, parent)
        record("provisioner", kernel_id=kernel_id, cls=type(provisioner).__name__,
               module=type(provisioner).__module__, argv=list(kernel_spec.argv),
               test=os.environ.get("PYTEST_CURRENT_TEST", ""))
        return provisioner

    KernelProvisionerFactory.create_provisioner_instance = create_provisioner_instance

    launch = KernelManager._async_launch_kernel

    @functools.wraps(launch)
    async def _async_launch_kernel(self, kernel_cmd, **kw):
        await launch(self, kernel_cmd, **kw)
        prov = self.provisioner
        record("launched", kernel_id=self.kernel_id, cls=type(prov).__name__,
               module=type(prov).__module__,
               pid=getattr(prov, "pid", None) or getattr(getattr(prov, "process", None),
                                                         "pid", None),
               container_id=getattr(prov, "container_id", None),
               test=os.environ.get("PYTEST_CURRENT_TEST", ""))

    KernelManager._async_launch_kernel = _async_launch_kernel


def patch_server_extension() -> None:
    """What ``pip install`` enables in every jupyter_server (our server extension: the
    kernel manager that answers 429/503 and adopts, the websocket connection that
    explains a limit kill), which the peers' fixtures and the venv's editable install
    would leave out: linked before the server creates its kernel manager, loaded after."""
    try:
        from jupyter_server.serverapp import ServerApp
    except ImportError:  # a suite without jupyter_server
        return
    from limited_provisioner.server import extension

    init_configurables = ServerApp.init_configurables
    load_server_extensions = ServerApp.load_server_extensions

    @functools.wraps(init_configurables)
    def linked(self, *args, **kwargs):
        extension._link_jupyter_server_extension(self)
        return init_configurables(self, *args, **kwargs)

    @functools.wraps(load_server_extensions)
    def loaded(self, *args, **kwargs):
        result = load_server_extensions(self, *args, **kwargs)
        extension._load_jupyter_server_extension(self)
        record("server-extension", manager=type(self.kernel_manager).__name__)
        return result

    ServerApp.init_configurables = linked
    ServerApp.load_server_extensions = loaded


def pytest_configure(config) -> None:
    if BACKEND and BACKEND not in PROVISIONERS:
        raise ValueError(f"PEERS_BACKEND={BACKEND!r}: expected one of {sorted(PROVISIONERS)}")
    if BACKEND:
        patch_kernelspec_manager()
        patch_server_extension()
    patch_recording()
    record("configure", backend=BACKEND or "stock", pid=os.getpid())


def pytest_runtest_logreport(report) -> None:
    # Written as the run goes, so a run killed by the whole-run timeout (no junit file)
    # still says which tests ran and how they ended.
    if report.when == "call" or report.outcome != "passed":
        first = ""
        if report.failed and report.longrepr is not None:
            crash = getattr(report.longrepr, "reprcrash", None)
            first = crash.message if crash is not None else str(report.longrepr)
            first = first.strip().splitlines()[0] if first.strip() else ""
        record("test", nodeid=report.nodeid, when=report.when, outcome=report.outcome,
               message=first[:500], duration=round(report.duration, 2))
