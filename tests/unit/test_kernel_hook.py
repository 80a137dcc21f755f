"""The kernel's startup hook (kernel_hook.py), run the way ipykernel runs its exec_files,
in a real IPython InteractiveShell: no kernel, no process, no Docker."""

from __future__ import annotations

import ast
import builtins
import io
import logging
import runpy
import sys
from types import SimpleNamespace

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.shellapp import InteractiveShellApp
from traitlets.config import Config

from limited_provisioner import kernel_hook
from limited_provisioner.kernel_hook import (
    MEM_LIMIT_ENV,
    NOTICE_ENV,
    OUTPUT_LIMIT_ENV,
    hook_source,
)
from limited_provisioner.proxy import OUTPUT_NOTICE


class Stream(io.StringIO):
    """A sys.stdout/sys.stderr whose write the hook can replace (a StringIO's is read-only)."""


@pytest.fixture
def shell(monkeypatch, tmp_path):
    """A fresh InteractiveShell, with what creating one changes in sys and builtins put
    back afterwards."""
    for name in (NOTICE_ENV, MEM_LIMIT_ENV, OUTPUT_LIMIT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    for name in ("ps1", "ps2"):
        monkeypatch.setattr(sys, name, getattr(sys, name, None), raising=False)
    builtin_names = set(vars(builtins))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    config.InteractiveShell.colors = "nocolor"
    InteractiveShell.clear_instance()
    try:
        yield InteractiveShell.instance(config=config)
    finally:
        InteractiveShell.clear_instance()
        for name in set(vars(builtins)) - builtin_names:
            delattr(builtins, name)


@pytest.fixture
def hook_file(tmp_path):
    """The hook as the provisioner writes it into the kernel dir."""
    path = tmp_path / "hooks.py"
    path.write_text(hook_source())
    return path


def own_streams(monkeypatch):
    """Throwaway sys.stdout/sys.stderr, the only streams the hook then wraps. Set in the
    test itself: pytest puts its capture back between a fixture's setup and the test."""
    monkeypatch.setattr(sys, "stdout", Stream())
    monkeypatch.setattr(sys, "stderr", Stream())


def exec_file(shell, path):
    """What ``--IPKernelApp.exec_files=<path>`` does at kernel start: IPKernelApp is an
    InteractiveShellApp, whose own _exec_file runs it (safe_execfile in user_ns)."""
    app = SimpleNamespace(
        shell=shell, ipython_dir=str(path.parent), extra_args=[], log=logging.getLogger()
    )
    InteractiveShellApp._exec_file(app, str(path))


def run(shell, code, msg_id="other-execution"):
    """Run a cell as the execution ``msg_id``; returns (result, its stdout)."""
    shell.parent_header = {"header": {"msg_id": msg_id, "msg_type": "execute_request"}}
    start = len(sys.stdout.getvalue())
    result = shell.run_cell(code)
    return result, sys.stdout.getvalue()[start:]


@pytest.fixture
def hook(shell, hook_file, monkeypatch, tmp_path):
    """Call to install the hook in ``shell`` (limits as the provisioner's environment)."""

    def hook(output_limit=100_000):
        own_streams(monkeypatch)
        monkeypatch.setenv(NOTICE_ENV, str(tmp_path / "notice"))
        monkeypatch.setenv(MEM_LIMIT_ENV, "512M")
        monkeypatch.setenv(OUTPUT_LIMIT_ENV, str(output_limit))
        exec_file(shell, hook_file)
        shell.notice = tmp_path / "notice"
        return shell

    return hook


def test_exec_files_leaves_the_user_namespace_as_it_was(shell, hook_file, monkeypatch):
    own_streams(monkeypatch)
    monkeypatch.setenv(OUTPUT_LIMIT_ENV, "100")
    # Names a startup file (run before exec_files) may have bound, that the hook also uses.
    shell.user_ns.update(os="a user's os", install="a user's install")
    before = dict(shell.user_ns)
    exec_file(shell, hook_file)
    assert sorted(set(shell.user_ns) - set(before)) == []
    assert sorted(set(before) - set(shell.user_ns)) == []
    assert [name for name in before if shell.user_ns[name] is not before[name]] == []
    # ... and it did run: it is installed.
    assert shell.custom_exceptions == (KeyboardInterrupt, MemoryError)
    assert "write" in vars(sys.stdout)  # the output cap's wrapper


def test_importing_or_running_without_ipython_installs_nothing(shell, hook_file, monkeypatch):
    own_streams(monkeypatch)
    for run_name in ("limited_provisioner.kernel_hook", "__main__"):
        namespace = runpy.run_path(str(hook_file), run_name=run_name)
        assert callable(namespace["install"])
    assert shell.custom_exceptions == ()
    assert "write" not in vars(sys.stdout)


def test_interrupt_of_the_execution_named_in_the_notice_is_a_timeout_error(hook):
    hooked = hook()
    hooked.notice.write_text("exec-1\nexec_timeout of 2s reached; the kernel stays up\n")
    result, out = run(hooked, "raise KeyboardInterrupt", msg_id="exec-1")
    assert isinstance(result.error_in_exec, TimeoutError)
    assert str(result.error_in_exec) == "exec_timeout of 2s reached; the kernel stays up"
    assert "TimeoutError: exec_timeout of 2s reached; the kernel stays up" in out
    assert "KeyboardInterrupt" not in out
    # Once: the next error is the error that happened.
    result, _ = run(hooked, "1 / 0", msg_id="exec-2")
    assert isinstance(result.error_in_exec, ZeroDivisionError)


@pytest.mark.parametrize("notice", ["exec-0\nexec_timeout of 2s reached", None])
def test_interrupt_of_another_execution_stays_a_keyboard_interrupt(hook, notice):
    hooked = hook()
    if notice is not None:
        hooked.notice.write_text(notice)
    result, out = run(hooked, "raise KeyboardInterrupt", msg_id="exec-1")
    assert type(result.error_in_exec) is KeyboardInterrupt
    assert "KeyboardInterrupt" in out
    assert "TimeoutError" not in out and "exec_timeout" not in out


def test_memory_error_names_the_memory_limit(hook):
    hooked = hook()
    result, out = run(hooked, "raise MemoryError('cannot allocate 1 GiB')")
    text = (
        "memory limit 512M reached (limited-provisioner): cannot allocate 1 GiB; "
        "free memory (del large objects) or ask for a larger mem_limit"
    )
    assert type(result.error_in_exec) is MemoryError
    assert str(result.error_in_exec) == text
    assert f"MemoryError: {text}" in out


def test_a_memory_error_that_takes_other_arguments_is_explained_too(hook):
    """numpy raises _ArrayMemoryError(shape, dtype): rebuilding it from a text fails, and
    a failing handler would be unregistered by IPython for the rest of the kernel's life
    (IPython 8.12 then even hides the original error behind a TypeError)."""
    hooked = hook()
    code = (
        "class ArrayMemoryError(MemoryError):\n"
        "    def __init__(self, shape, dtype):\n"
        "        super().__init__(f'Unable to allocate for {shape} {dtype}')\n"
        "raise ArrayMemoryError((10**5, 10**5), 'float64')"
    )
    result, out = run(hooked, code)
    assert type(result.error_in_exec) is MemoryError
    assert str(result.error_in_exec).startswith(
        "memory limit 512M reached (limited-provisioner): Unable to allocate for (100000, "
    )
    assert "Custom TB Handler failed" not in out + sys.stderr.getvalue()
    result, _ = run(hooked, "raise MemoryError('again')")  # still registered
    assert str(result.error_in_exec).startswith("memory limit 512M reached")


def test_print_past_the_output_limit_is_cut_once_and_the_budget_resets(hook):
    hooked = hook(output_limit=100)
    _, out = run(hooked, "print('x' * 300)\nprint('y' * 300)")
    assert out == "x" * 100 + OUTPUT_NOTICE.format(limit=100)  # the proxy's notice too
    _, out = run(hooked, "print('hello')")
    assert out == "hello\n"
    # stdout and stderr share the budget.
    _, out = run(hooked, "import sys\nprint('a' * 59)\nprint('b' * 60, file=sys.stderr)")
    assert out == "a" * 59 + "\n"
    assert sys.stderr.getvalue().endswith("b" * 40 + OUTPUT_NOTICE.format(limit=100))


def test_notice_file_is_read_bounded(hook):
    hooked = hook()
    hooked.notice.write_text("exec-1\n" + "a" * 10_000)
    result, _ = run(hooked, "raise KeyboardInterrupt", msg_id="exec-1")
    assert isinstance(result.error_in_exec, TimeoutError)
    assert str(result.error_in_exec) == "a" * (kernel_hook.NOTICE_MAX_BYTES - len("exec-1\n"))
    assert kernel_hook.NOTICE_MAX_BYTES == 4096


def test_user_names_do_not_break_the_hook(hook):
    hooked = hook(output_limit=100)
    # A user's own "len"/"str"/"TimeoutError" (or the hook's names deleted from the
    # namespace) must not reach what the hook runs at every write and error.
    run(hooked, "len = 3\nstr = 'text'\nTimeoutError = None\nopen = None")
    _, out = run(hooked, "print('z' * 300)")
    assert out == "z" * 100 + OUTPUT_NOTICE.format(limit=100)
    result, _ = run(hooked, "raise MemoryError()")
    assert str(result.error_in_exec).startswith("memory limit 512M reached (limited-provisioner);")
    hooked.notice.write_text("exec-1\ntimed out")
    result, _ = run(hooked, "raise KeyboardInterrupt", msg_id="exec-1")
    assert type(result.error_in_exec).__name__ == "TimeoutError"


def test_hook_source_is_this_stdlib_only_python_3_8_module():
    source = hook_source()
    assert hook_source() is source  # cached
    with open(kernel_hook.__file__, encoding="utf-8") as f:
        assert source == f.read()
    tree = ast.parse(source, feature_version=(3, 8))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= set(sys.stdlib_module_names), imported
    assert len(source.splitlines()) <= 200
