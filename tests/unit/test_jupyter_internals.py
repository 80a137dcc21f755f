"""Every private jupyter_client / jupyter_server name we use still exists.

limited_provisioner/_jupyter_internals.py wraps each one; an upgrade of either library
that renames or removes one fails here, by name, instead of in a running server.
"""

from __future__ import annotations

import importlib

import pytest

from limited_provisioner import _jupyter_internals as internals


def _instance(where: str):
    module, _, name = where.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if name == "KernelRestarter":
        return cls  # needs a kernel manager to build; the method is on the class
    if name == "KernelProvisionerBase":
        return cls  # abstract
    return cls()


@pytest.mark.parametrize(
    ("where", "name"), internals.PRIVATE_NAMES,
    ids=[f"{w.rpartition(':')[2]}.{n}" for w, n in internals.PRIVATE_NAMES],
)
def test_private_name_still_exists(where, name):
    assert hasattr(_instance(where), name), f"{where} has no {name} any more"


def test_every_private_name_used_is_listed():
    """A new private access must be added to PRIVATE_NAMES (and so to this test)."""
    import ast
    from pathlib import Path

    source = Path(internals.__file__).read_text()
    used = {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not node.attr.startswith("__")
    }
    listed = {name for _, name in internals.PRIVATE_NAMES}
    assert used <= listed, f"not in PRIVATE_NAMES: {sorted(used - listed)}"
