"""JupyterLab in a real browser: the notebook's kernel works in the notebook's folder.

A ``jupyter lab`` (as root, our server extension, a limited kernelspec per backend) whose
root holds ``project/`` owned by a user (uid 1000) with ``data.csv``. The notebook
``project/analysis.ipynb`` reads ``data.csv`` by its bare name and writes
``result.csv``; after the kernel is shut down, ``result.csv`` is there, owned by uid
1000, and JupyterLab's file browser lists it. Screenshots in
``$LIMITED_PROVISIONER_TEST_ARTIFACTS/browser/``. The server is stopped by pid and the
kernels (containers by label) removed afterwards, even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from .conftest import backends
from .harness import JupyterServer, remove_all_kernels, server_env, write_kernelspec
from .test_browser import SCREENSHOTS, _playwright_or_skip, notebook_page

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="per-kernel uids need root")

USER = 1000
SPEC = {"mem_limit": "512M", "cpu_limit": 1, "disk_limit": "64M"}
DATA = "city,visitors\nLyon,12\nNantes,7\n"
CELL = ("rows = open('data.csv').read().splitlines()[1:]; "
        "open('result.csv', 'w').write(str(sum(int(r.split(',')[1]) for r in rows))); "
        "print('total', open('result.csv').read())")


@contextlib.asynccontextmanager
async def lab_with_project(tmp_path: Path, provisioner: str):
    """``jupyter lab`` whose root (under /var/lib: kernels get a private /tmp) holds a
    user's ``project/``; yields (server, root)."""
    jupyter_path = tmp_path / "jupyter"
    write_kernelspec(jupyter_path, "limited-python", SPEC, provisioner)
    settings = tmp_path / "lab-settings"
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    state = Path(tempfile.mkdtemp(prefix="lp-", dir="/var/lib"))
    root = Path(tempfile.mkdtemp(prefix="lp-lab-", dir="/var/lib"))
    root.chmod(0o755)
    project = root / "project"
    project.mkdir()
    (project / "data.csv").write_text(DATA)
    for path in (project, project / "data.csv"):
        os.chown(path, USER, USER)
    env = {
        **server_env(state, "test-" + uuid.uuid4().hex[:8], jupyter_path),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
    }
    server = JupyterServer(tmp_path, env, app="jupyterlab", root_dir=root)
    try:
        await server.start()
        yield server, root
    finally:
        await server.stop(timeout=20)
        remove_all_kernels(state)
        print(server.logs(8000))
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("backend", backends(), indirect=True)
async def test_a_notebook_reads_and_writes_its_own_folder_in_jupyterlab(tmp_path, backend):
    async_api = _playwright_or_skip()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    kind = "docker" if "docker" in backend else "process"
    async with lab_with_project(tmp_path, backend) as (server, root), notebook_page(
        async_api, server.base, "project/analysis.ipynb",
        failure_shot=f"99-workspace-{kind}-failure.png",
    ) as nb:
        await nb.run(0, CELL)
        await async_api.expect(nb.output(0)).to_have_text("total 19")

        [session] = await server.api("GET", "/api/sessions")
        await server.api("DELETE", f"/api/kernels/{session['kernel']['id']}")
        result = root / "project" / "result.csv"
        assert result.read_text() == "19"
        st = result.stat()
        assert (st.st_uid, st.st_gid) == (USER, USER)

        # The file browser (opened on the notebook's folder) lists it.
        page = nb.page
        item = page.locator(".jp-DirListing-content .jp-DirListing-item", has_text="result.csv")
        for _ in range(20):
            if await item.count():
                break
            await page.locator(
                ".jp-FileBrowser-toolbar [data-command='filebrowser:refresh']").first.click()
            await page.wait_for_timeout(500)
        await async_api.expect(item).to_have_count(1)
        await nb.shot(f"workspace-{kind}.png")
