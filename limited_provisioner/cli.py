"""``limited-provisioner``: install limited kernelspecs, list limited kernels, fill the
wheelhouse kernels install packages from."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from .errors import LimitConfigError, SandboxUnavailableError
from .kernelspec_view import describe_settings, spec_differences
from .limits import Limits, format_size
from .reaper import ORPHAN_GRACE
from .registry import Registry, is_alive
from .usage import sample_usage

PROVISIONERS = {
    "process": "limited-process-provisioner",
    "docker": "limited-docker-provisioner",
    "swarm": "limited-swarm-provisioner",
}
LIMIT_FLAGS = [
    ("mem_limit", 'memory for the kernel\'s process tree, e.g. "512M", "2G"'),
    ("cpu_limit", "CPU cores, e.g. 0.5 or 2"),
    ("pids_limit", "maximum processes/threads"),
    ("nofile_limit", "maximum open files per process"),
    ("disk_limit", 'bytes the kernel may write, e.g. "1G"'),
    ("files_limit", "maximum files in the work dir"),
    ("exec_timeout", 'seconds one execution may run, e.g. "30s" (0 = off)'),
    ("idle_timeout", 'idle seconds before shutdown, e.g. "1h" (0 = off)'),
    ("max_kernels", "host-wide cap on limited kernels"),
    ("max_kernels_per_user", "per-owner cap on limited kernels"),
]


# Subcommand -> (one-line help, description), in the order `--help` lists them.
COMMANDS = {
    "install": (
        "install a kernelspec whose kernels run under limits",
        "Install a kernelspec that uses a limited provisioner. Limits not given stay at the "
        "provisioner's configured defaults.",
    ),
    "build-image": (
        "build the default kernel image for the docker backend",
        "Build the kernel image (slim Python + ipykernel + non-root user) from the "
        "Dockerfile shipped in this package. Needs a Docker daemon that can pull "
        "python:3.11-slim.",
    ),
    "reap": (
        "remove kernels left behind by servers that are gone",
        "Remove limited kernels whose server is gone and that died or whose idle clock (or "
        "max_lifetime) ran out: their processes or containers, cgroups, host dirs and "
        "registry entries. Only touches kernels in our registry; with a swarm kernelspec, "
        "also the swarm kernels of servers silent there for orphan_grace.",
    ),
    "list": (
        "list limited kernelspecs and running limited kernels",
        "Show installed kernelspecs that use a limited provisioner and the limited kernels "
        "running on this host.",
    ),
    "wheelhouse": (
        "fill or list the wheelhouse kernels install packages from",
        "Fill the directory of wheels that kernels with the `wheelhouse` setting install "
        "from without network (`wheelhouse add PKG...`: the operator's pip downloads "
        "binary wheels of them and their dependencies, plus pip itself), or list it.",
    ),
}
DEFAULT_WHEELHOUSE = "/var/lib/limited-provisioner-wheelhouse"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="limited-provisioner",
        description="Resource-limited Jupyter kernels: install kernelspecs, list kernels.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    install, build, reap, lst, wheels = (
        sub.add_parser(name, help=text, description=description)
        for name, (text, description) in COMMANDS.items()
    )
    install.add_argument("--name", default="limited-python", help="kernelspec name")
    install.add_argument(
        "--display-name", default=None, help='name shown in Jupyter (default: "Python (limited)")'
    )
    install.add_argument(
        "--backend", choices=sorted(PROVISIONERS), default="process", help="where kernels run"
    )
    for name, text in LIMIT_FLAGS:
        install.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=text)
    install.add_argument(
        "--network",
        choices=["true", "false"],
        default=None,
        help="allow network access (default false)",
    )
    install.add_argument("--image", default=None, help="container image (docker backend)")
    install.add_argument(
        "--runtime", default=None,
        help='OCI runtime of the container, as the Docker daemon has it registered: "runc" '
        '(default) or "runsc" for gVisor (docker backend)',
    )
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument(
        "--sys-prefix", action="store_true", help=f"install into sys.prefix ({sys.prefix})"
    )
    where.add_argument("--prefix", default=None, help="install under this prefix")
    install.add_argument(
        "--replace", action="store_true",
        help="replace an existing kernelspec of this name whose settings differ",
    )

    build.add_argument("--tag", default=None, help="image tag (default: the docker default image)")

    reap.add_argument("--dry-run", action="store_true", help="only list what would go")
    reap.add_argument("--all-servers", action="store_true", help="not only this server's kernels")
    reap.add_argument("--server-id", default=None, help="server whose kernels to consider")
    reap.add_argument("--state-dir", default=None, help="registry location (default: auto)")
    reap.add_argument(
        "--orphan-grace", type=float, default=None, metavar="SECONDS",
        help="seconds a running kernel of a gone server may wait to be adopted "
        f"(default: LimitedHost.orphan_grace, {ORPHAN_GRACE:g}; 0: until its idle timeout)",
    )

    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.add_argument("--state-dir", default=None, help="registry location (default: auto)")

    wheel_commands = wheels.add_subparsers(dest="wheel_command", required=True,
                                           metavar="ACTION")
    add = wheel_commands.add_parser(
        "add", help="download wheels of packages (and their dependencies) into it",
        description="Download binary wheels of PKG... and their dependencies (and of pip) "
        "with pip download --only-binary=:all:, for the Python of --python (default: this "
        "one, the process backend's) or of --python-version/--platform (e.g. the docker "
        "image's: 3.11 for the default image).",
    )
    add.add_argument("packages", nargs="+", metavar="PKG", help='requirement, e.g. "pandas<3"')
    shown = wheel_commands.add_parser("list", help="list what it holds")
    for action in (add, shown):
        action.add_argument("--dir", default=DEFAULT_WHEELHOUSE,
                            help=f"the wheelhouse (default: {DEFAULT_WHEELHOUSE})")
    add.add_argument("--python", default=sys.executable,
                     help="interpreter whose pip downloads and whose version and platform "
                     "the wheels are for (default: this one)")
    add.add_argument("--python-version", default=None,
                     help='wheels for this Python version instead, e.g. "3.11"')
    add.add_argument("--platform", action="append", default=None,
                     help='wheels for this platform tag instead, e.g. "manylinux2014_x86_64" '
                     "(repeatable)")
    return parser


def _kernel_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name, _ in LIMIT_FLAGS:
        value = getattr(args, name)
        if value is not None:
            config[name] = _json_value(value)
    if args.network is not None:
        config["network"] = args.network == "true"
    if args.image is not None:
        config["image"] = args.image
    if args.runtime is not None:
        if args.backend == "swarm" and args.runtime != "runc":
            msg = (f"--runtime {args.runtime}: a Swarm service runs under each node's "
                   "default runtime; use --backend docker for gVisor")
            raise LimitConfigError(msg)
        config["runtime"] = args.runtime
    # Validate now, so a typo fails at install time instead of at the first kernel start.
    Limits.from_config(**{k: v for k, v in config.items() if k in Limits.__dataclass_fields__})
    for cap in ("max_kernels", "max_kernels_per_user"):
        if cap in config:
            from .limits import parse_count

            parse_count(cap, config[cap])
    return config


def _json_value(text: str) -> Any:
    """'2' -> 2, '0.5' -> 0.5, '512M' -> '512M'."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _destination(name: str, args: argparse.Namespace) -> Path:
    """Where KernelSpecManager.install_kernel_spec puts kernelspec ``name`` for these
    --user/--sys-prefix/--prefix flags (the same rule, from jupyter_core's public paths)."""
    from jupyter_core.paths import SYSTEM_JUPYTER_PATH, jupyter_data_dir

    if args.user:
        return Path(jupyter_data_dir(), "kernels", name)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    if prefix:
        return Path(os.path.abspath(prefix), "share", "jupyter", "kernels", name)
    return Path(SYSTEM_JUPYTER_PATH[0], "kernels", name)


def cmd_install(args: argparse.Namespace) -> int:
    try:
        config = _kernel_config(args)
    except LimitConfigError as e:
        print(f"limited-provisioner install: {e}", file=sys.stderr)
        return 2
    # In a container the interpreter is the image's; on the host it is this one.
    python = "python3" if args.backend in ("docker", "swarm") else sys.executable
    spec = {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": args.display_name or "Python (limited)",
        "language": "python",
        # As ipykernel's own kernelspec: JupyterLab's debugger (debugpy talks to the
        # kernel over its sandbox's loopback), CurveZMQ for transport_encryption (the
        # proxy's client sockets serve it).
        "metadata": {
            "debugger": True,
            "supported_encryption": ["curve"],
            "kernel_provisioner": {
                "provisioner_name": PROVISIONERS[args.backend],
                "config": config,
            },
        },
    }
    name = args.name.lower()  # as install_kernel_spec names it
    existing = _destination(name, args)
    limits = describe_settings(args.backend, config)
    try:
        old = json.loads((existing / "kernel.json").read_text())
    except FileNotFoundError:
        old = None
    except (OSError, ValueError) as e:
        old = {"unreadable": str(e)}
    if old is not None and not args.replace:
        changes = spec_differences(old, spec) if "unreadable" not in old else [
            f"the existing kernel.json cannot be read ({old['unreadable']})"
        ]
        if not changes:
            print(f"Kernelspec {name} in {existing} unchanged; its kernels run with:")
            print(limits)
            return 0
        print(
            f"limited-provisioner install: kernelspec {name} already exists in {existing} "
            "with other settings:\n  " + "\n  ".join(changes) + "\n"
            "Pass --replace to overwrite it, or --name to install another one.",
            file=sys.stderr,
        )
        return 2
    prefix = sys.prefix if args.sys_prefix else args.prefix
    tmp = tempfile.mkdtemp()
    try:
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(spec, f, indent=1)
        dest = KernelSpecManager().install_kernel_spec(
            tmp, kernel_name=name, user=args.user, prefix=prefix
        )
    except OSError as e:
        print(
            f"limited-provisioner install: cannot write kernelspec: {e}; "
            "use --user or --sys-prefix, or --prefix DIR",
            file=sys.stderr,
        )
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verb = "Replaced" if old is not None else "Installed"
    print(f"{verb} kernelspec {name} in {dest}; its kernels run with:")
    print(limits)
    return 0


def _limited_specs() -> list[dict[str, Any]]:
    ksm = KernelSpecManager()
    result = []
    for name, info in sorted(ksm.get_all_specs().items()):
        meta = info["spec"].get("metadata", {}).get("kernel_provisioner", {})
        if meta.get("provisioner_name") in PROVISIONERS.values():
            result.append(
                {
                    "name": name,
                    "resource_dir": info["resource_dir"],
                    "provisioner": meta["provisioner_name"],
                    "config": meta.get("config", {}),
                }
            )
    return result


def _running(state_dir: str | None, swarm_daemons: set[str] = frozenset()) -> list[dict[str, Any]]:
    """This host's registered kernels, then the swarm kernels of every server (on any
    node) that this host's registry does not hold, as the swarm has them."""
    rows = []
    now = time.time()
    for entry in Registry(state_dir).entries():
        entry = dict(entry)
        entry["alive"] = is_alive(entry)
        entry["age_s"] = round(now - entry.get("created", now), 1)
        entry["idle_s"] = round(now - entry.get("last_activity", entry.get("created", now)), 1)
        rows.append(entry)
    sample_usage(rows)
    known = {row.get("kernel_id") for row in rows}
    for row in _swarm_rows(swarm_daemons):
        if row.get("kernel_id") not in known:
            row.update(alive=row["state"] == "running", mem_used=0, cpu_cores=0.0, pids=[],
                       age_s=round(now - row.get("created", now), 1), idle_s=None)
            rows.append(row)
    return rows


def _swarm_daemons(specs: list[dict[str, Any]]) -> set[str]:
    """The swarm managers the swarm kernelspecs use ("": $DOCKER_HOST or the socket)."""
    return {str(s["config"].get("docker_host") or "") for s in specs
            if s["provisioner"] == PROVISIONERS["swarm"]}


def _swarm_rows(daemons: set[str]) -> list[dict[str, Any]]:
    from .docker.client import DockerSession
    from .swarm import records

    rows = []
    for docker_host in sorted(daemons):
        session = DockerSession(docker_host)
        try:
            rows += records.swarm_kernels(session.call)
        except Exception as e:  # noqa: BLE001 - an unreachable manager must not hide the rest
            print(f"warning: swarm kernels at {session.where} not listed: {e}", file=sys.stderr)
    return rows


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def cmd_list(args: argparse.Namespace) -> int:
    specs = _limited_specs()
    kernels = _running(args.state_dir, _swarm_daemons(specs))
    if args.json:
        json.dump({"kernelspecs": specs, "kernels": kernels}, sys.stdout, indent=1)
        print()
        return 0
    print("Limited kernelspecs:")
    if not specs:
        print("  (none; create one with: limited-provisioner install)")
    for s in specs:
        config = ", ".join(f"{k}={v}" for k, v in sorted(s["config"].items())) or "defaults"
        print(f"  {s['name']:<24} {s['provisioner']:<30} {config}")
    print()
    print("Running limited kernels:")
    if not kernels:
        print("  (none)")
        return 0
    print(
        f"  {'KERNEL ID':<36}  {'BACKEND':<7}  {'OWNER':<10}  {'PID':>7}  {'MEM USE / LIMIT':>16}"
        f"  {'MEM %':>6}  {'CPU / LIMIT':>11}  {'PIDS':>9}  {'AGE':>6}  {'IDLE':>6}  STATE"
    )
    for k in kernels:
        lim = k.get("limits", {})
        state = k.get("state", "?") if k["alive"] else "dead"
        used, mem_limit = k["mem_used"], lim.get("mem_limit")
        mem = f"{format_size(used) if used else '-'} / {format_size(mem_limit)}"
        mem_pct = f"{100 * used / mem_limit:.1f}%" if used and mem_limit else "-"
        cpu = f"{k['cpu_cores']:.2f} / {lim.get('cpu_limit') or '-'}"
        pids = f"{len(k['pids'])} / {lim.get('pids_limit') or '-'}"
        print(
            f"  {k.get('kernel_id', '?'):<36}  {k.get('backend', '?'):<7}  "
            f"{str(k.get('owner', '?'))[:10]:<10}  {k.get('pid') or '-':>7}  {mem:>16}  "
            f"{mem_pct:>6}  {cpu:>11}  {pids:>9}  {_duration(k['age_s']):>6}  "
            f"{_duration(k['idle_s']) if k['idle_s'] is not None else '-':>6}  {state}"
        )
    return 0


def cmd_build_image(args: argparse.Namespace) -> int:
    import docker.errors

    from .docker import DEFAULT_IMAGE
    from .docker.client import DockerSession

    tag = args.tag or DEFAULT_IMAGE
    context = Path(__file__).parent / "docker" / "image"
    try:
        client = DockerSession().client()  # $DOCKER_HOST, else the local socket
        for chunk in client.api.build(path=str(context), tag=tag, decode=True, rm=True):
            if "stream" in chunk:
                sys.stdout.write(chunk["stream"])
            elif "error" in chunk:
                print(f"limited-provisioner build-image: {chunk['error']}", file=sys.stderr)
                return 1
    except (docker.errors.DockerException, SandboxUnavailableError) as e:
        print(f"limited-provisioner build-image: {e}", file=sys.stderr)
        return 1
    print(f"Built {tag}")
    return 0


def cmd_reap(args: argparse.Namespace) -> int:
    from .docker.client import DockerSession
    from .host import LimitedHost
    from .reaper import reap
    from .swarm import presence

    host = LimitedHost.instance()
    server_id = args.server_id or host.resolved_server_id
    grace = host.orphan_grace if args.orphan_grace is None else args.orphan_grace
    done: list[Any] = reap(
        Registry(args.state_dir),
        server_id=server_id,
        all_servers=args.all_servers,
        dry_run=args.dry_run,
        orphan_grace=grace,
    )
    verb = "would reap" if args.dry_run else "reaped"
    for orphan in done:
        print(f"{verb} {orphan.kernel_id} ({orphan.backend}, owner {orphan.owner}): {orphan.why}")
    status = 0
    # Swarm kernels of every server, judged by their servers' heartbeats in the swarm.
    for docker_host in sorted(_swarm_daemons(_limited_specs())):
        session = DockerSession(docker_host)
        try:
            in_swarm = presence.reap_swarm(session.call, orphan_grace=grace,
                                           dry_run=args.dry_run)
        except Exception as e:  # noqa: BLE001 - said, and the exit status says it
            print(f"limited-provisioner reap: swarm at {session.where} not reaped: {e}",
                  file=sys.stderr)
            status = 1
            continue
        for orphan in in_swarm:
            print(f"{verb} {orphan.kernel_id} (swarm, owner {orphan.owner}): {orphan.why}")
        done += in_swarm
    if not done:
        print("nothing to reap")
    return status


def cmd_wheelhouse(args: argparse.Namespace) -> int:
    import subprocess

    from . import wheelhouse

    where = os.path.abspath(args.dir)
    if args.wheel_command == "add":
        os.makedirs(where, mode=0o755, exist_ok=True)
        cmd = wheelhouse.download_command(
            args.packages, where, python=args.python, python_version=args.python_version,
            platforms=args.platform,
        )
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            print("limited-provisioner wheelhouse: pip download failed (a package without "
                  "a wheel for this Python is not added: kernels build none)",
                  file=sys.stderr)
            return 1
        wheelhouse.make_readable(where)
    try:
        wheelhouse.check_wheelhouse(where)
    except LimitConfigError as e:
        print(f"limited-provisioner wheelhouse: {e}", file=sys.stderr)
        return 1
    for dist in wheelhouse.list_wheelhouse(where):
        note = "" if dist.kind == "wheel" else "  (source only: kernels do not install it)"
        print(f"  {dist.name:<30} {dist.version:<14} {dist.file}{note}")
    print(f"wheelhouse {where}: set wheelhouse={where!r} in the kernels' config")
    return 0


COMMAND_FUNCTIONS = {
    "install": cmd_install, "build-image": cmd_build_image, "reap": cmd_reap, "list": cmd_list,
    "wheelhouse": cmd_wheelhouse,
}


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        status = COMMAND_FUNCTIONS[args.command](args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at exit
    except BrokenPipeError:
        # Whoever read our output stopped (`limited-provisioner list | head`). As the
        # Python docs (signal module, "Note on SIGPIPE") do it: point stdout at devnull,
        # so the interpreter's own flush at exit raises nothing, and fail quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
