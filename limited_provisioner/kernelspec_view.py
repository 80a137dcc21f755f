"""A limited kernelspec as ``limited-provisioner install`` shows it: every setting its
kernels get (given in the spec, or the default), and what would change if one spec replaced
another."""

from __future__ import annotations

import json
from typing import Any

from .errors import LimitConfigError
from .limits import format_size
from .settings import LimitedSettings

# What `install` can set, in the order it shows them (image: the docker backend's only).
SETTINGS = (
    "mem_limit", "cpu_limit", "pids_limit", "nofile_limit", "disk_limit", "files_limit",
    "exec_timeout", "idle_timeout", "max_kernels", "max_kernels_per_user", "network",
)


def format_value(name: str, value: Any) -> str:
    """A parsed setting as users write it: "1G", "0.5 cores", "30s", "off", "no cap"."""
    if name == "network":
        return "on" if value else "off"
    if name in ("image", "runtime"):
        return str(value)
    if value is None:
        return "no cap" if name.startswith("max_kernels") else "unlimited"
    if name in ("mem_limit", "disk_limit"):
        return format_size(value)
    if name == "cpu_limit":
        return f"{value:g} core" + ("" if value == 1 else "s")
    if name in ("exec_timeout", "idle_timeout"):
        return _seconds(value) if value else "off"
    return str(value)


def _seconds(value: float) -> str:
    """3600 -> "1h", 90 -> "1m30s", 2.5 -> "2.5s"."""
    if value != int(value) or value < 60:
        return f"{value:g}s"
    parts, rest = [], int(value)
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def effective_settings(backend: str, config: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """(name, parsed value, given?) of every setting the install can set: the given value,
    else the default a kernel of this backend gets (unless the server's Jupyter config sets
    ``c.LimitedProvisioner.<name>``)."""
    from .docker import DEFAULT_IMAGE  # the docker SDK: only when asked

    traits = LimitedSettings.class_traits()
    rows = []
    for name in SETTINGS:
        trait = traits[name]
        given = name in config
        rows.append((name, trait.parse(name, config[name] if given else trait.default_value),
                     given))
    if backend in ("docker", "swarm"):
        rows.append(("image", config.get("image", DEFAULT_IMAGE), "image" in config))
    if backend == "docker":
        rows.append(("runtime", config.get("runtime", "runc"), "runtime" in config))
    return rows


def describe_settings(backend: str, config: dict[str, Any]) -> str:
    lines = [
        f"  {name:<21} {format_value(name, value):<12} ({'given' if given else 'default'})"
        for name, value, given in effective_settings(backend, config)
    ]
    lines.append(
        "(a default applies unless the server's Jupyter config sets c.LimitedProvisioner.<name>)"
    )
    return "\n".join(lines)


def spec_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What would change if ``new`` replaced the kernelspec ``old``, one line per
    setting; [] when they are the same."""
    changes = []
    old_prov = old.get("metadata", {}).get("kernel_provisioner") or {}
    new_prov = new["metadata"]["kernel_provisioner"]
    if old_prov.get("provisioner_name") != new_prov["provisioner_name"]:
        was = old_prov.get("provisioner_name") or "none (a kernel without limits)"
        changes.append(f"provisioner: {was} -> {new_prov['provisioner_name']}")
    old_config, new_config = old_prov.get("config") or {}, new_prov["config"]
    for name in sorted(set(old_config) | set(new_config)):
        if old_config.get(name, _MISSING) == new_config.get(name, _MISSING):
            continue
        was = _given_or_default(old_config, name)
        now = _given_or_default(new_config, name)
        changes.append(f"{name}: {was} -> {now}")
    for key in ("display_name", "argv", "language", "env"):
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}")
    return changes


_MISSING = object()


def _given_or_default(config: dict[str, Any], name: str) -> str:
    if name not in config:
        return "default"
    try:
        return format_value(name, _parse_setting(name, config[name]))
    except (LimitConfigError, KeyError):
        return json.dumps(config[name])  # not one of ours, or not valid: as written


def _parse_setting(name: str, value: Any) -> Any:
    if name in ("image", "runtime"):
        return value
    return LimitedSettings.class_traits()[name].parse(name, value)
