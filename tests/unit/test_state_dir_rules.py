"""Where a non-root server keeps its state: short enough for the kernels' ipc sockets."""

import os
import uuid

import pytest

from limited_provisioner import registry
from limited_provisioner.connection import IPC_SUFFIX, MAX_IPC_PATH
from limited_provisioner.registry import MAX_STATE_DIR_LEN, default_state_dir


def test_longest_state_dir_still_fits_the_kernel_sockets():
    state_dir = "/" + "s" * (MAX_STATE_DIR_LEN - 1)
    kernel_socket = f"{state_dir}/kernels/{uuid.uuid4()}/sock/k"
    client_socket = f"{state_dir}/clients/{uuid.uuid4()}/c"
    assert len(kernel_socket) + IPC_SUFFIX == MAX_IPC_PATH
    assert len(client_socket) + IPC_SUFFIX <= MAX_IPC_PATH


@pytest.fixture
def as_user(monkeypatch, tmp_path):
    """A non-root server with a typical home and Jupyter runtime dir."""
    monkeypatch.delenv(registry.STATE_DIR_ENV, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/alice")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", "/home/alice/.local/share/jupyter/runtime")
    return tmp_path


def test_user_without_session_runtime_dir_gets_a_short_dir_in_home(as_user, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    # The Jupyter runtime dir is too long for ipc sockets for any home dir.
    assert str(default_state_dir()) == "/home/alice/.limited-provisioner"


def test_user_session_runtime_dir_is_preferred(as_user, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setattr(registry, "_private_dir", lambda path: path == "/run/user/1000")
    assert str(default_state_dir()) == "/run/user/1000/limited-provisioner"


def test_a_runtime_dir_others_can_write_is_not_used(as_user, monkeypatch):
    shared = as_user / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    assert not str(default_state_dir()).startswith(str(shared))


def test_short_jupyter_runtime_dir_is_kept(as_user, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", "/srv/jr")
    assert str(default_state_dir()) == "/srv/jr/limited-provisioner"
