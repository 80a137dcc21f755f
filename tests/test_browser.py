"""JupyterLab in a real browser: a limited kernel, its memory limit as the user sees it.

A ``jupyter lab`` subprocess with our server extension and a ``limited-python``
kernelspec (256M), driven by playwright through Debian's chromium. Screenshots of each
step (and of a failure) go to ``$LIMITED_PROVISIONER_TEST_ARTIFACTS/browser/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .conftest import TEST_OWNER, backends
from .harness import (
    JUPYTER_CONFIG,
    PROVISIONERS,
    REPO,
    TOKEN,
    JupyterServer,
    remove_all_kernels,
    write_kernelspec,
)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("LIMITED_PROVISIONER_TEST_ARTIFACTS", REPO / "test-artifacts"))
SCREENSHOTS = ARTIFACTS / "browser"
SPEC = {"mem_limit": "256M", "cpu_limit": 1, "pids_limit": 64, "nofile_limit": 256,
        "disk_limit": "64M"}
NOTEBOOK = "limits.ipynb"
# Small touched chunks: resident memory reaches the 256M cgroup limit before any single
# allocation hits the data rlimit (128M higher), so the kernel is OOM-killed rather than
# getting a MemoryError. One line, so the editor's auto-indent cannot reshape it.
MEMORY_BOMB = "chunks = [b'x' * (8 * 2**20) for _ in range(10**4)]"
# How long after the restart dialog (or the notice) the other one may still come.
NOTICE_GRACE = 8.0
UI_TIMEOUT_MS = 60_000


def _playwright_or_skip():
    """The async playwright API, or skip (fail under LIMITED_PROVISIONER_REQUIRE_BROWSER=1)."""
    reason = None
    try:
        from playwright import async_api
    except ImportError as e:
        reason = f"playwright is not installed: {e}"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("LIMITED_PROVISIONER_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return async_api


@contextlib.asynccontextmanager
async def running_lab(tmp_path: Path, provisioner: str = PROVISIONERS["process"]):
    """``jupyter lab`` on a free port with a limited kernelspec and a private state dir;
    stopped by pid and its kernels removed afterwards, even on failure. Yields base url."""
    jupyter_path = tmp_path / "jupyter"
    write_kernelspec(jupyter_path, "limited-python", {**SPEC, "owner": TEST_OWNER}, provisioner)
    settings = tmp_path / "lab-settings"
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    # No "fetch Jupyter news?" toast over the notebook, no request to the internet.
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    root = tmp_path / "notebooks"
    # SIGUSR2 makes the server print every thread's Python stack (from C, so it works even
    # when the main thread is stuck): what a failure report needs to say where it stood.
    diag_config = tmp_path / "diag-config"
    diag_config.mkdir()
    (diag_config / "jupyter_server_config.py").write_text(
        "import faulthandler, signal\n"
        "faulthandler.register(signal.SIGUSR2, all_threads=True)\n"
    )
    state = tempfile.mkdtemp(prefix="lp-", dir="/var/lib")
    env = {
        **os.environ,
        "JUPYTER_PATH": str(jupyter_path),
        "JUPYTER_CONFIG_PATH": os.pathsep.join([str(JUPYTER_CONFIG), str(diag_config)]),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "LIMITED_PROVISIONER_STATE_DIR": state,
        "LIMITED_PROVISIONER_SERVER_ID": "test-" + uuid.uuid4().hex[:8],
    }
    server = JupyterServer(tmp_path, env, app="jupyterlab", root_dir=root, args=(
        # e.g. "--ServerApp.log_level=DEBUG" when chasing a failure
        os.environ.get("LIMITED_PROVISIONER_TEST_LAB_ARGS", "").split()))
    try:
        await server.start()
        try:
            yield server.base
        except BaseException:
            print(server_state(server.proc))
            raise
    finally:
        await server.stop(timeout=20)
        remove_all_kernels(Path(state))
        print(server.logs(12000))


def server_state(proc: subprocess.Popen) -> str:
    """What the server process is doing: its exit status, or each thread's state and
    wait channel, plus every thread's Python stack into its log (SIGUSR2, registered
    above; jupyter_server owns SIGUSR1)."""
    code = proc.poll()
    if code is not None:
        return f"jupyter lab had exited with status {code}"
    lines = [f"jupyter lab (pid {proc.pid}) is alive; threads:"]
    for task in sorted(Path(f"/proc/{proc.pid}/task").glob("*")):
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            state = stat[stat.rindex(")") + 2:].split()[0]
            wchan = (task / "wchan").read_text()
            comm = (task / "comm").read_text().strip()
            lines.append(f"  {task.name} {comm}: state {state}, wchan {wchan}")
    with contextlib.suppress(OSError):
        proc.send_signal(signal.SIGUSR2)
        time.sleep(1)
    return "\n".join(lines)


async def create_notebook(base: str, path: str = NOTEBOOK) -> None:
    """A notebook on the limited kernel, so opening it starts that kernel, no picker."""
    content = {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "limited-python", "display_name": "limited-python",
                                    "language": "python"}},
        "cells": [{"cell_type": "code", "id": "c0", "source": "", "metadata": {},
                   "outputs": [], "execution_count": None}],
    }
    await AsyncHTTPClient().fetch(HTTPRequest(
        f"{base}/api/contents/{path}?token={TOKEN}", method="PUT",
        body=json.dumps({"type": "notebook", "format": "json", "content": content})))


class Notebook:
    """The open notebook panel, as a user drives it."""

    def __init__(self, page, expect):
        self.page = page
        self.expect = expect

    def cell(self, index: int):
        return self.page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").nth(index)

    def output(self, index: int):
        """The outputs of cell ``index`` (without the ``[n]:`` prompt)."""
        return self.cell(index).locator(".jp-OutputArea-output")

    async def output_text(self, index: int) -> str:
        return " | ".join(" ".join(t.split()) for t in await self.output(index).all_inner_texts())

    async def wait_idle(self) -> None:
        """Kernel connected and idle. (The toolbar indicator says "idle" while there is
        no kernel yet; the status bar names the kernel.)"""
        await self.expect(self.page.locator("#jp-main-statusbar")).to_contain_text(
            "limited-python | Idle"
        )

    async def kernel_status(self) -> str:
        """The kernel state the status bar shows: "Idle", "Busy", "Restarting", ..."""
        text = await self.page.locator("#jp-main-statusbar").inner_text()
        match = re.search(r"limited-python \| (\w+)", text)
        return match.group(1) if match else " ".join(text.split())

    async def run(self, index: int, code: str) -> None:
        """Type ``code`` into cell ``index`` and run it with Shift+Enter."""
        editor = self.cell(index).locator(".cm-content")
        await editor.click()
        await self.page.keyboard.type(code)
        # Auto-closed brackets/quotes are stepped over when typed: the text is as typed.
        await self.expect(editor).to_have_text(code)
        await self.page.keyboard.press("Shift+Enter")

    async def shot(self, name: str) -> Path:
        path = SCREENSHOTS / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    async def dialog_text(self) -> str:
        dialogs = self.page.locator(".jp-Dialog")
        return " | ".join(await dialogs.all_inner_texts()) if await dialogs.count() else ""

    async def dismiss_dialogs(self) -> list[str]:
        """Accept every open dialog ("Kernel Restarting"...); returns their texts."""
        seen = []
        dialog = self.page.locator(".jp-Dialog").first
        while await dialog.count():
            seen.append(" ".join((await dialog.inner_text()).split()))
            await dialog.locator(".jp-Dialog-button.jp-mod-accept").first.click()
            await dialog.wait_for(state="detached")
        return seen

    async def toasts_text(self) -> str:
        toasts = self.page.locator(".Toastify__toast")
        return " | ".join(" ".join(t.split()) for t in await toasts.all_inner_texts())


def has_notice(seen: dict) -> bool:
    text = " ".join([seen["output"], seen["toasts"], *seen["dialogs"]])
    return "memory limit" in text and "256M" in text


async def watch_memory_notice(nb: Notebook, index: int) -> dict:
    """After the memory bomb in cell ``index``: collect what the page says (output area,
    dialogs, notifications, kernel status) until the notice and the restart dialog were
    both seen, or ``NOTICE_GRACE`` seconds after the first of them; dismisses dialogs."""
    seen: dict = {"dialogs": [], "output": "", "toasts": "", "statuses": []}
    deadline = time.monotonic() + 45
    first_sign = None
    while time.monotonic() < deadline:
        seen["dialogs"] += await nb.dismiss_dialogs()
        seen["output"] = await nb.output_text(index)
        seen["toasts"] = await nb.toasts_text()
        status = await nb.kernel_status()
        if not seen["statuses"] or seen["statuses"][-1] != status:
            seen["statuses"].append(status)
        if has_notice(seen) and seen["dialogs"]:
            break
        if has_notice(seen) or seen["dialogs"]:
            first_sign = first_sign or time.monotonic()
            if time.monotonic() - first_sign > NOTICE_GRACE:
                break
        await asyncio.sleep(0.2)
    return seen


async def test_memory_limit_in_jupyterlab(tmp_path):
    async_api = _playwright_or_skip()
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    async with running_lab(tmp_path) as base, notebook_page(async_api, base) as nb:
        await nb.run(0, "1+1")
        await async_api.expect(nb.output(0)).to_have_text("2")
        await nb.shot("01-one-plus-one.png")

        await nb.run(1, MEMORY_BOMB)
        seen = await watch_memory_notice(nb, 1)
        await nb.shot("02-memory-limit.png")

        # The kernel came back and works (checked before the notice, so a missing
        # notice still tells whether the restart worked). Idle by itself: our
        # websocket echoes the state JupyterLab would otherwise ignore until the
        # next execution (server/websocket.py).
        seen["dialogs"] += await nb.dismiss_dialogs()
        await nb.wait_idle()
        await nb.run(2, 'print("alive")')
        await async_api.expect(nb.output(2)).to_have_text("alive")
        # A fresh kernel: the execution count started again.
        await async_api.expect(nb.cell(2).locator(".jp-InputPrompt")).to_have_text("[1]:")
        await nb.shot("03-after-restart.png")

    print("after the OOM kill the page showed:", seen)
    assert has_notice(seen), (
        "no memory-limit notice in the notebook after the OOM kill; the page showed:\n"
        f"  output area of the bomb cell: {seen['output']!r}\n"
        f"  dialogs: {seen['dialogs']!r}\n"
        f"  notifications: {seen['toasts']!r}\n"
        f"  kernel status sequence: {seen['statuses']!r}\n"
        f"  screenshots: {SCREENSHOTS}"
    )


# -- the status-bar item of our labextension (labextension/, limited_provisioner/labextension)

# Touches every page, so the 100M are resident and charged to the kernel. One line.
ALLOCATE_100M = "blob = bytearray(100 * 2**20); blob[::4096] = b'x' * (100 * 2**20 // 4096)"
UNITS = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def shown_memory(text: str) -> int:
    """The bytes "Mem 120M / 256M" says the kernel uses."""
    match = re.search(r"Mem ([\d.]+)([BKMGT]) / 256M", text)
    assert match, f"no memory figure in the status-bar item: {text!r}"
    return int(float(match.group(1)) * UNITS[match.group(2)])


@contextlib.asynccontextmanager
async def notebook_page(async_api, base: str, path: str = NOTEBOOK,
                        failure_shot: str = "99-failure.png"):
    """Chromium on the notebook ``path`` (created first), its kernel idle; screenshot
    and page state printed on failure, browser closed afterwards."""
    async with async_api.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            async_api.expect.set_options(timeout=UI_TIMEOUT_MS)
            nb = Notebook(page, async_api.expect)
            try:
                await create_notebook(base, path)
                await page.goto(f"{base}/lab/tree/{path}?token={TOKEN}")
                await nb.cell(0).locator(".cm-content").wait_for()
                await nb.wait_idle()
                yield nb
            except BaseException:
                with contextlib.suppress(Exception):  # the page itself may be gone
                    print("dialogs:", await nb.dialog_text(), "toasts:", await nb.toasts_text(),
                          "status bar:", await page.locator("#jp-main-statusbar").inner_text())
                    await nb.shot(failure_shot)
                raise
        finally:
            await browser.close()


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_status_bar_shows_the_kernels_limits_usage_and_why_it_restarted(tmp_path, backend):
    """The item shows memory/CPU/pids/disk against the limits and grows with the kernel;
    after an OOM kill the "Kernel Restarting" dialog says which limit, and the kernel
    status comes back to Idle by itself (no execution needed)."""
    async_api = _playwright_or_skip()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    name = backend.split("-")[1]
    async with running_lab(tmp_path, backend) as base, notebook_page(
        async_api, base, failure_shot="99-statusbar-failure.png"
    ) as nb:
        expect, page = async_api.expect, nb.page
        item = page.locator(".lp-LimitsStatus")
        await expect(item).to_contain_text("/ 256M")
        for part in ("CPU", "/ 100%", "pids", "/64", "disk", "/ 64M"):
            await expect(item).to_contain_text(part)
        assert await item.get_attribute("data-lp-kernel")
        before = shown_memory(await item.inner_text())

        await nb.run(0, ALLOCATE_100M)
        await expect(nb.cell(0).locator(".jp-InputPrompt")).to_have_text("[1]:")
        deadline = time.monotonic() + 15  # polled every 2 s
        while (after := shown_memory(await item.inner_text())) < before + 80 * 2**20:
            assert time.monotonic() < deadline, (before, await item.inner_text())
            await asyncio.sleep(0.5)
        await item.screenshot(path=str(SCREENSHOTS / f"statusbar-{name}.png"))
        await page.locator("#jp-main-statusbar").screenshot(
            path=str(SCREENSHOTS / f"statusbar-full-{name}.png"))
        print(f"status-bar memory: {before} -> {after} bytes")

        await nb.run(1, MEMORY_BOMB)
        reason = page.locator(".jp-Dialog .lp-DeathReason")
        await expect(reason).to_contain_text("memory limit 256M exceeded")
        await expect(page.locator(".jp-Dialog")).to_contain_text("appears to have died")
        await nb.shot(f"statusbar-dialog-{name}.png")
        await nb.dismiss_dialogs()
        # Back to Idle without running anything: not "Unknown" until the next execution.
        await nb.wait_idle()
        await expect(item).to_contain_text("/ 256M")
        await nb.shot(f"statusbar-after-restart-{name}.png")
        await nb.run(2, 'print("alive")')
        await expect(nb.output(2)).to_have_text("alive")
