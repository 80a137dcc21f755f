"""The ``limited-provisioner`` command, run as a real subprocess."""

import json
import os
import re
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


def test_install_a_swarm_kernelspec(tmp_path):
    """--backend swarm: the image's python3 (not this interpreter, whose path means
    nothing on a node), the image in its settings; a runtime a service cannot pick is
    refused, nothing written."""
    prefix = tmp_path / "prefix"
    result = subprocess.run(
        [*CLI, "install", "--prefix", str(prefix), "--name", "onswarm", "--backend", "swarm",
         "--image", "my/kernel:1", "--mem-limit", "1G"],
        capture_output=True, text=True, check=True,
    )
    assert re.search(r"image\s+my/kernel:1\s+\(given\)", result.stdout), result.stdout
    spec = KernelSpecManager(
        kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")]).get_kernel_spec("onswarm")
    assert spec.argv[0] == "python3"
    prov = spec.metadata["kernel_provisioner"]
    assert prov["provisioner_name"] == "limited-swarm-provisioner"
    assert prov["config"] == {"mem_limit": "1G", "image": "my/kernel:1"}
    refused = subprocess.run(
        [*CLI, "install", "--prefix", str(tmp_path / "other"), "--name", "g", "--backend",
         "swarm", "--runtime", "runsc"], capture_output=True, text=True, check=False,
    )
    assert refused.returncode == 2
    assert "runs under each node's default runtime" in refused.stderr, refused.stderr
    assert not (tmp_path / "other").exists()


def test_install_refuses_a_bad_limit_and_writes_nothing(tmp_path):
    result = subprocess.run(
        [*CLI, "install", "--prefix", str(tmp_path), "--mem-limit", "12 parsecs"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "mem_limit='12 parsecs' is not a size" in result.stderr
    assert not (tmp_path / "share").exists()


def test_help_everywhere():
    for args in ([], ["install"], ["list"], ["wheelhouse"], ["wheelhouse", "add"],
                 ["wheelhouse", "list"]):
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



def _install(prefix, *args):
    return subprocess.run(
        [*CLI, "install", "--prefix", str(prefix), "--name", "lim", *args],
        capture_output=True, text=True,
    )


def _settings_shown(stdout):
    """{name: (value, "given"|"default")} from install's table."""
    rows = re.findall(r"^  (\w+) +(.+?) +\((given|default)\)$", stdout, re.MULTILINE)
    return {name: (value, how) for name, value, how in rows}


def test_install_prints_the_limits_it_wrote_and_the_defaults_that_apply(tmp_path):
    result = _install(tmp_path, "--mem-limit", "1G", "--exec-timeout", "90s")
    assert result.returncode == 0, result.stderr
    shown = _settings_shown(result.stdout)
    assert shown["mem_limit"] == ("1G", "given")
    assert shown["exec_timeout"] == ("1m30s", "given")
    # LimitedSettings' defaults, what a kernel of this spec gets unless the server's config
    # says otherwise.
    assert shown["pids_limit"] == ("256", "default")
    assert shown["cpu_limit"] == ("1 core", "default")
    assert shown["disk_limit"] == ("10G", "default")
    assert shown["idle_timeout"] == ("1h", "default")
    assert shown["network"] == ("off", "default")
    assert shown["max_kernels"] == ("no cap", "default")
    assert "image" not in shown  # docker only
    docker = _install(tmp_path / "d", "--backend", "docker")
    from limited_provisioner.docker import DEFAULT_IMAGE

    assert _settings_shown(docker.stdout)["image"] == (DEFAULT_IMAGE, "default")
    assert _settings_shown(docker.stdout)["runtime"] == ("runc", "default")
    gvisor = _install(tmp_path / "g", "--backend", "docker", "--runtime", "runsc")
    assert _settings_shown(gvisor.stdout)["runtime"] == ("runsc", "given")
    spec = json.loads(next((tmp_path / "g").rglob("kernel.json")).read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"]["runtime"] == "runsc"


def test_install_does_not_silently_replace_a_kernelspec_with_other_limits(tmp_path):
    spec = tmp_path / "share" / "jupyter" / "kernels" / "lim" / "kernel.json"
    assert _install(tmp_path, "--mem-limit", "1G", "--pids-limit", "64").returncode == 0
    written = spec.read_text()

    same = _install(tmp_path, "--mem-limit", "1G", "--pids-limit", "64")
    assert same.returncode == 0 and "unchanged" in same.stdout, same.stdout
    assert _settings_shown(same.stdout)["mem_limit"] == ("1G", "given")

    other = _install(tmp_path, "--mem-limit", "2G", "--cpu-limit", "0.5")
    assert other.returncode == 2
    assert "already exists" in other.stderr and "--replace" in other.stderr
    assert "mem_limit: 1G -> 2G" in other.stderr
    assert "cpu_limit: default -> 0.5 cores" in other.stderr
    assert "pids_limit: 64 -> default" in other.stderr
    assert spec.read_text() == written  # untouched

    replaced = _install(tmp_path, "--mem-limit", "2G", "--cpu-limit", "0.5", "--replace")
    assert replaced.returncode == 0 and "Replaced kernelspec lim" in replaced.stdout
    config = json.loads(spec.read_text())["metadata"]["kernel_provisioner"]["config"]
    assert config == {"mem_limit": "2G", "cpu_limit": 0.5}


def test_install_refuses_to_turn_a_stock_kernelspec_into_a_limited_one_silently(tmp_path):
    spec = tmp_path / "share" / "jupyter" / "kernels" / "lim" / "kernel.json"
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"argv": ["python3"], "display_name": "Py", "language": "python"}))
    result = _install(tmp_path)
    assert result.returncode == 2
    assert "provisioner: none (a kernel without limits) -> limited-process-provisioner" in (
        result.stderr)


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """`limited-provisioner list --json | head -c 10`: the reader is gone before the output
    is; here it is gone before the first byte, so every write meets a closed pipe."""
    for args in (["list", "--json"], ["list"], ["install", "--prefix", str(tmp_path)]):
        proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 1, (args, stderr)
        assert stderr == "", (args, stderr)
    shell = subprocess.run(
        f"{' '.join(CLI)} list --json | head -c 10", shell=True, capture_output=True, text=True
    )
    assert shell.stdout == '{\n "kernel' and shell.stderr == ""


def test_install_shows_every_setting_it_takes():
    from limited_provisioner.cli import LIMIT_FLAGS
    from limited_provisioner.kernelspec_view import SETTINGS

    assert set(SETTINGS) == {name for name, _ in LIMIT_FLAGS} | {"network"}


def test_wheelhouse_add_fills_a_dir_every_kernel_may_read(tmp_path):
    where = tmp_path / "wheels"
    added = subprocess.run(
        [*CLI, "wheelhouse", "add", "tabulate", "--dir", str(where)], capture_output=True,
        text=True, preexec_fn=lambda: os.umask(0o077),  # an operator's strict umask
    )
    assert added.returncode == 0, added.stderr
    assert "--only-binary=:all:" in added.stdout
    wheels = sorted(p.name for p in where.iterdir())
    assert [w.split("-")[0] for w in wheels] == ["pip", "tabulate"], wheels
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in where.iterdir())
    assert where.stat().st_mode & 0o777 == 0o755
    listed = subprocess.run([*CLI, "wheelhouse", "list", "--dir", str(where)],
                            capture_output=True, text=True, check=True)
    assert re.search(r"^  tabulate +\S+ +tabulate-\S+\.whl$", listed.stdout, re.MULTILINE)
    assert f"wheelhouse={str(where)!r}" in listed.stdout


def test_wheelhouse_add_fails_for_a_package_pip_cannot_get(tmp_path):
    added = subprocess.run(
        [*CLI, "wheelhouse", "add", "lp-no-such-package-anywhere", "--dir", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert added.returncode == 1
    assert "pip download failed" in added.stderr


def test_wheelhouse_list_refuses_a_world_writable_dir(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w").chmod(0o777)
    listed = subprocess.run([*CLI, "wheelhouse", "list", "--dir", str(tmp_path / "w")],
                            capture_output=True, text=True)
    assert listed.returncode == 1
    assert "writable by every user" in listed.stderr
