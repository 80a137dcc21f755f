"""The warm pool's pure parts: the claim's code run in a pristine kernel, and what makes
two kernels interchangeable (the fingerprint)."""

from __future__ import annotations

import os

import pytest

from limited_provisioner import pool
from limited_provisioner.process.provisioner import LimitedProcessProvisioner


class FakeShell:
    def __init__(self) -> None:
        self.user_ns: dict = {}


@pytest.fixture
def sandbox_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LP_GONE", "x")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_claim(code: str) -> dict:
    shell = FakeShell()
    namespace = {"get_ipython": lambda: shell}
    exec(compile(code, "<claim>", "eval"), namespace)
    namespace.pop("get_ipython")
    namespace.pop("__builtins__", None)
    return {"names": namespace, "user_ns": shell.user_ns}


def test_the_claim_sets_env_folder_and_session_and_leaves_no_name(sandbox_env, tmp_path):
    folder = tmp_path / "nb"
    folder.mkdir()
    code = pool.claim_code({"FOO": "bar's \"quoted\"", "JPY_SESSION_NAME": "/nb/a.ipynb"},
                           ["LP_GONE"], str(folder))
    got = run_claim(code)
    assert os.environ["FOO"] == "bar's \"quoted\"" and "LP_GONE" not in os.environ
    assert os.getcwd() == str(folder)
    assert got["user_ns"] == {"__session__": "/nb/a.ipynb"}
    assert got["names"] == {}  # nothing left in the kernel's namespace
    os.environ.pop("FOO")
    os.environ.pop("JPY_SESSION_NAME")


def test_the_claim_code_is_one_expression_whatever_it_carries():
    for args in (({}, [], "/x"), ({"A": "1"}, [], None), ({}, ["B"], None)):
        compile(pool.claim_code(*args), "<claim>", "eval")  # no statement to leave names


def prov(**config):
    return LimitedProcessProvisioner(kernel_id="k", **config)


def test_identity_and_caps_are_not_fingerprinted():
    base = pool.settings_of(prov())
    for name, value in [("owner", "alice"), ("labels", {"a": "b"}), ("pool_size", 3),
                        ("max_kernels", 2), ("workspace", "private")]:
        assert pool.settings_of(prov(**{name: value})) == base, name


def test_what_shapes_the_kernel_is_fingerprinted():
    base = pool.fingerprint({"settings": pool.settings_of(prov())})
    for name, value in [("network", True), ("output_limit", "1M"), ("wheelhouse", "/w"),
                        ("env_keep", ["X"])]:
        other = pool.fingerprint({"settings": pool.settings_of(prov(**{name: value}))})
        assert other != base, name


@pytest.mark.parametrize(("said", "passed_on"), [
    ("5.3", True), ("5.4", True), ("5", False), ("5.3\n", False), ("5.3; x", False),
    ("1234.1", False), ("", False),
])
def test_only_a_protocol_version_a_kernel_says_is_passed_on_to_jupyter_server(said, passed_on):
    assert (pool.PROTOCOL_VERSION.fullmatch(said) is not None) is passed_on
