"""What a kernel finds in its environment: an allow-list of the server's variables, and
the variables that tell the kernel's hook about its limits.

Everything else of the server's environment (tokens, cloud credentials, Jupyter's and
JupyterHub's own settings) stays out of reach of the code the kernel runs.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from .kernel_hook import MEM_LIMIT_ENV, NOTICE_ENV, OUTPUT_LIMIT_ENV
from .limits import Limits, format_size

# Exact names; a pattern never lets a secret-looking name through.
DEFAULT_ENV_KEEP = [
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TERM",
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "PYTHONIOENCODING",
    "PYTHONUNBUFFERED",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "CONDA_DEFAULT_ENV",
    "JPY_SESSION_NAME",
    # Names the cells in tracebacks (nbclient's tests set it for stable output).
    "IPYKERNEL_CELL_NAME",
    "MPLBACKEND",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "LIMITED_PROVISIONER_OWNER",
]
# A container's PATH, LANG, PYTHONPATH... come from its image, not from the host.
CONTAINER_ENV_KEEP = ["JPY_SESSION_NAME", "IPYKERNEL_CELL_NAME", "LIMITED_PROVISIONER_OWNER"]
# Variables naming the host's directories: not passed into a container even when a
# caller sets them in start_kernel(env=...) (a kernelspec's env still can).
HOST_PATH_ENV = (
    "PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "HOME",
)
# Parts of a name that mark it as a secret: such a variable reaches a kernel only when
# the kernelspec's env or env_keep names it exactly (and the log says so).
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "COOKIE")
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)


def supplied_names(start_env: dict[str, str] | None, server_env: dict[str, str]) -> set[str]:
    """The variables a caller of ``start_kernel(env=...)`` set on purpose: those whose
    value is not the server's own (nbclient's ``IPYKERNEL_CELL_NAME``, a test's tmpdir).

    A copy of the server's environment passed along unchanged adds nothing: its
    variables still go through the allow-list.
    """
    if not start_env or start_env is server_env:
        return set()
    return {name for name, value in start_env.items() if server_env.get(name) != value}


def filter_env(
    env: dict[str, str], keep: list[str], explicit: set[str], supplied: set[str] = frozenset()
) -> tuple[dict[str, str], list[str], list[str]]:
    """The variables of ``env`` a kernel may see; the secret-looking ones passed because
    ``explicit`` (the kernelspec's env) or an exact ``keep`` entry names them; and the
    secret-looking ones dropped although the caller ``supplied`` them."""
    exact = {p for p in keep if not any(c in p for c in "*?[")}
    patterns = [p for p in keep if p not in exact]
    result, named_secrets, refused = {}, [], []
    for name, value in env.items():
        if name in explicit or name in exact:
            result[name] = value
            if looks_secret(name):
                named_secrets.append(name)
        elif looks_secret(name):
            # A caller's env may be a whole copy of a server's environment with its
            # token in it: a secret needs the operator's word (env_keep, kernelspec).
            if name in supplied:
                refused.append(name)
        elif name in supplied or any(fnmatch.fnmatchcase(name, p) for p in patterns):
            result[name] = value
    return result, named_secrets, refused


def keep_allowed(
    env: dict[str, str],
    keep: list[str],
    explicit: set[str],
    log: Any,
    kernel_id: str,
    supplied: set[str] = frozenset(),
) -> None:
    """Reduce ``env`` in place to what :func:`filter_env` allows; log each secret-looking
    name passed because it was named, and each one a caller supplied that was dropped."""
    kept, named_secrets, refused = filter_env(env, keep, explicit, supplied)
    env.clear()
    env.update(kept)
    for name in named_secrets:
        log.warning(
            "Kernel %s: passing %s to the kernel because the kernelspec's env or env_keep "
            "names it; code in the kernel can read it", kernel_id, name,
        )
    if refused:
        log.warning(
            "Kernel %s: not passing %s from start_kernel(env=...): secret-looking names "
            "reach a kernel only when env_keep or the kernelspec's env names them",
            kernel_id, ", ".join(sorted(refused)),
        )


def limit_env(limits: Limits, output_limit: int | None, notice_file: str | None) -> dict[str, str]:
    """Variables every limited kernel gets (both backends)."""
    # ipykernel treats a parent pid of 1 (init) as "managed, but do not poll the parent":
    # the kernel outlives a crashed server so it can be re-adopted, and it does not print
    # its standalone connection banner into the server's stdout.
    env = {"JPY_PARENT_PID": "1"}
    if notice_file:
        env[NOTICE_ENV] = notice_file
    if limits.mem_limit:
        env[MEM_LIMIT_ENV] = format_size(limits.mem_limit)
    if output_limit:
        env[OUTPUT_LIMIT_ENV] = str(output_limit)
    return env
