"""The ``limited-provisioner`` command, run as a real subprocess."""

import json
import re
import os
import subprocess
import sys

from jupyter_client.kernelspec import KernelSpecManager

CLI = [sys.executable, "-m", "limited_provisioner.cli"]


def _env(jupyter_path):
    return {**os.environ, "JUPYTER_PATH": str(jupyter_path)}


def test_install_into_prefix_is_found_by_jupyter(tmp_path):
    prefix = tmp_path / "prefix"
    result = subprocess.run(
        [*CLI, "install", "--prefix", str(prefix), "--name", "tiny", "--display-name",
         "Tiny", "--mem-limit", "512M", "--cpu-limit", "0.5", "--pids-limit", "64",
         "--network", "false", "--exec-timeout", "30s"],
        capture_output=True, text=True, check=True,
    )
    assert "Installed kernelspec tiny" in result.stdout
    share = prefix / "share" / "jupyter"
    ksm = KernelSpecManager(kernel_dirs=[str(share / "kernels")])
    spec = ksm.get_kernel_spec("tiny")
    assert spec.display_name == "Tiny"
    prov = spec.metadata["kernel_provisioner"]
    assert prov["provisioner_name"] == "limited-process-provisioner"
    assert prov["config"] == {
        "mem_limit": "512M", "cpu_limit": 0.5, "pids_limit": 64,
        "network": False, "exec_timeout": "30s",
    }
    # What ipykernel's own kernelspec declares (JupyterLab's debugger, CurveZMQ), too.
    from ipykernel.kernelspec import get_kernel_dict

    for key, value in get_kernel_dict()["metadata"].items():
        assert spec.metadata[key] == value, (key, spec.metadata)
    listed = subprocess.run(
        [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
        capture_output=True, text=True, check=True, env=_env(share),
    )
    assert "tiny" in json.loads(listed.stdout)["kernelspecs"]
    ours = subprocess.run(
        [*CLI, "list", "--json"], capture_output=True, text=True, check=True, env=_env(share)
    )
    assert "tiny" in [s["name"] for s in json.loads(ours.stdout)["kernelspecs"]]


def test_install_refuses_a_bad_limit_and_writes_nothing(tmp_path):
    result = subprocess.run(
        [*CLI, "install", "--prefix", str(tmp_path), "--mem-limit", "12 parsecs"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "mem_limit='12 parsecs' is not a size" in result.stderr
    assert not (tmp_path / "share").exists()


def test_help_everywhere():
    for args in ([], ["install"], ["list"]):
        result = subprocess.run([*CLI, *args, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: limited-provisioner" in result.stdout


async def test_list_shows_running_kernel(start_kernel, jupyter_path):
    km, _ = await start_kernel({"mem_limit": "300M", "pids_limit": 64})
    result = subprocess.run(
        [*CLI, "list"], capture_output=True, text=True, check=True, env=_env(jupyter_path)
    )
    line = next(x for x in result.stdout.splitlines() if km.kernel_id in x)
    assert "/ 300M" in line and "running" in line and str(km.provisioner.pid) in line
    assert re.search(r" \d+\.\d% ", line), line  # MEM %
    assert re.search(r" [1-9]\d* / 64 ", line), line  # PIDS in use / pids_limit
    data = subprocess.run(
        [*CLI, "list", "--json"], capture_output=True, text=True, check=True,
        env=_env(jupyter_path),
    )
    (row,) = [k for k in json.loads(data.stdout)["kernels"] if k["kernel_id"] == km.kernel_id]
    assert row["alive"] and row["mem_used"] > 10 * 2**20  # a real kernel's resident memory
    assert km.provisioner.pid in row["pids"]
    assert row["idle_s"] >= 0 and row["age_s"] >= 0


def test_build_image_reports_a_missing_daemon_clearly():
    result = subprocess.run(
        [*CLI, "build-image", "--tag", "lp-never-built:1"], capture_output=True, text=True,
        env={**os.environ, "DOCKER_HOST": "unix:///var/run/no-such-docker.sock"},
    )
    assert result.returncode == 1
    assert "Docker daemon unreachable" in result.stderr and "DOCKER_HOST" in result.stderr

