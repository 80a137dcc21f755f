"""Where a kernel works (workspace.py) and what the launcher is told about it: decided
without starting anything."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from limited_provisioner.enforcement import process_plan
from limited_provisioner.errors import LimitConfigError, SandboxStartError
from limited_provisioner.limits import Limits
from limited_provisioner.process.launch import _SETID_CALLS, SETID_BITS
from limited_provisioner.process.sandbox import launch_spec
from limited_provisioner.settings import LimitedSettings
from limited_provisioner.workspace import (
    Workspace,
    WorkspaceError,
    chosen_folder,
    resolve_beneath,
    resolve_workspace,
    trusted_realpath,
    validate_setting,
)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="makes files of other uids")
KERNEL_UID = 64123


@pytest.mark.parametrize(("setting", "cwd", "folder"), [
    ("notebook", "/srv/nb/project", "/srv/nb/project"),
    ("notebook", None, None),  # from code or an agent: its private dir
    ("notebook", "", None),
    ("private", "/srv/nb/project", None),
    ("/data/shared", "/srv/nb/project", "/data/shared"),
    ("/data/shared", None, "/data/shared"),
])
def test_the_setting_and_the_start_choose_the_folder(setting, cwd, folder):
    assert chosen_folder(setting, cwd) == folder


@pytest.mark.parametrize("value", ["notebooks", "relative/path", "", "Notebook"])
def test_a_workspace_setting_that_means_nothing_is_refused_with_what_is_accepted(value):
    with pytest.raises(LimitConfigError, match="'notebook'.*'private'.*absolute path"):
        validate_setting(value)
    with pytest.raises(LimitConfigError):
        LimitedSettings(workspace=value)


@pytest.mark.parametrize(("old", "new"), [(True, "private"), (False, "notebook")])
def test_private_work_dir_still_means_what_it_meant(old, new):
    assert LimitedSettings(private_work_dir=old).workspace == new
    assert LimitedSettings().workspace == "notebook"


@root_only
def test_a_folder_of_a_user_is_mapped_onto_the_kernels_uid(tmp_path):
    folder = tmp_path / "nb"
    folder.mkdir()
    os.chown(folder, 1000, 1000)
    ws = resolve_workspace(str(folder), server_uid=0, kernel_uid=KERNEL_UID,
                           kernel_gid=KERNEL_UID)
    assert ws == Workspace(str(folder), 1000, 1000, uid_map=(1000, KERNEL_UID),
                           gid_map=(1000, KERNEL_UID))
    assert ws.to_spec() == {"path": str(folder), "read_only": False,
                            "uid_map": [1000, KERNEL_UID], "gid_map": [1000, KERNEL_UID]}


@root_only
def test_a_folder_in_roots_group_maps_the_owners_own_group_instead(tmp_path):
    folder = tmp_path / "nb"
    folder.mkdir()
    os.chown(folder, 1000, 0)
    ws = resolve_workspace(str(folder), server_uid=0, kernel_uid=KERNEL_UID,
                           kernel_gid=KERNEL_UID, owner_gid=1000)
    assert ws.gid_map == (1000, KERNEL_UID)


def test_a_root_owned_folder_is_read_only_never_mapped_onto_root(tmp_path):
    folder = tmp_path / "nb"
    folder.mkdir()
    if os.geteuid() == 0:
        os.chown(folder, 0, 0)
        ws = resolve_workspace(str(folder), server_uid=0, kernel_uid=KERNEL_UID,
                               kernel_gid=KERNEL_UID)
        assert ws.read_only and ws.uid_map is None and ws.gid_map is None
        assert "chown" in ws.why and "workspace='private'" in ws.why
        assert ws.to_spec() == {"path": str(folder), "read_only": True}


def test_a_kernel_without_its_own_uid_uses_the_folder_as_the_server_does(tmp_path):
    ws = resolve_workspace(str(tmp_path), server_uid=os.geteuid(), kernel_uid=None,
                           kernel_gid=None)
    assert not ws.read_only and ws.uid_map is None
    assert ws.path == os.path.realpath(tmp_path)


@pytest.mark.parametrize("scratch", ["/tmp", "/var/tmp", "/dev/shm"])
def test_a_notebook_directly_in_a_private_scratch_dir_is_refused_with_the_fix(scratch):
    if not os.path.isdir(scratch):
        pytest.skip(f"no {scratch}")
    with pytest.raises(WorkspaceError, match=f"private, empty copy.*{scratch}/work/"):
        resolve_workspace(scratch, server_uid=0, kernel_uid=KERNEL_UID, kernel_gid=KERNEL_UID)


def test_a_missing_folder_or_a_file_is_refused_naming_it(tmp_path):
    with pytest.raises(WorkspaceError, match="No such file"):
        resolve_workspace(str(tmp_path / "gone"), server_uid=0, kernel_uid=None,
                          kernel_gid=None)
    (tmp_path / "f").write_text("")
    with pytest.raises(WorkspaceError, match="not a folder"):
        resolve_workspace(str(tmp_path / "f"), server_uid=0, kernel_uid=None, kernel_gid=None)
    assert issubclass(WorkspaceError, SandboxStartError)  # 503 from a server


@root_only
def test_a_symlink_a_kernel_could_have_made_is_not_followed(tmp_path):
    """A kernel writing as uid 1000 can plant nb/evil -> /etc: a kernel started "in"
    nb/evil must not get /etc (nor any other folder) bound in its place."""
    nb = tmp_path / "nb"
    nb.mkdir()
    (nb / "evil").symlink_to("/etc")
    os.lchown(nb / "evil", 1000, 1000)
    with pytest.raises(WorkspaceError, match=r"symlink .*evil, owned by uid 1000.*real path \(/etc\)"):
        trusted_realpath(str(nb / "evil"), server_uid=0)
    (nb / "fine").symlink_to(nb)  # root's own link: followed
    assert trusted_realpath(str(nb / "fine"), server_uid=0) == str(nb)


def test_the_launcher_is_told_the_folder_and_never_makes_set_id_files(tmp_path):
    limits = Limits(mem_limit=512 * 2**20)
    plan = process_plan(limits, cgroups=["memory"], own_uid=True, isolated=True, netns=True,
                        nice=10, cpu_grace=0, scratch_dirs=["/tmp"], host_folder=True)
    ws = Workspace("/srv/nb", 1000, 1000, uid_map=(1000, KERNEL_UID),
                   gid_map=(1000, KERNEL_UID))
    spec = launch_spec(limits, plan, cwd="/var/lib/lp/kernels/k/work", cgroup_procs=[],
                       netns=True, nice=10, uid=KERNEL_UID, gid=KERNEL_UID, isolated=True,
                       writable=["/var/lib/lp/kernels/k/work"], workspace=ws)
    assert spec["cwd"] == "/srv/nb"
    assert spec["workspace"] == ws.to_spec()
    # Bound by the workspace entry (idmapped), not as a plain writable dir.
    assert spec["writable"] == ["/var/lib/lp/kernels/k/work"]
    assert spec["no_setid_files"] is True
    private = launch_spec(limits, plan, cwd="/var/lib/lp/kernels/k/work", cgroup_procs=[],
                          netns=True, nice=10, uid=KERNEL_UID, gid=KERNEL_UID, isolated=True,
                          writable=["/var/lib/lp/kernels/k/work"])
    assert "workspace" not in private and private["cwd"] == "/var/lib/lp/kernels/k/work"


def test_every_call_that_sets_a_mode_is_in_the_seccomp_table():
    """x86_64: chmod, fchmod, fchmodat, fchmodat2, open, creat, openat, mknod, mknodat,
    each with the index of its mode argument."""
    arch, calls = _SETID_CALLS["x86_64"]
    assert calls == {90: 1, 91: 1, 268: 2, 452: 2, 2: 2, 85: 1, 257: 3, 133: 1, 259: 2}
    assert SETID_BITS == 0o6000
    assert Path("/proc/self/ns/user").exists()


@root_only
def test_a_root_folder_closed_to_other_users_is_refused_with_the_fix(tmp_path):
    folder = tmp_path / "closed"
    folder.mkdir(mode=0o700)
    with pytest.raises(WorkspaceError, match=r"other users cannot read it \(mode drwx------\)"
                       r".*ServerApp.root_dir=/srv/notebooks.*workspace='private'"):
        resolve_workspace(str(folder), server_uid=0, kernel_uid=KERNEL_UID,
                          kernel_gid=KERNEL_UID)


@root_only
def test_a_folder_beneath_a_closed_dir_gets_that_dir_covered_by_a_skeleton(request):
    """A user's folder in root's 0700 home: the kernel's uid could not walk to it."""
    top = Path(tempfile.mkdtemp(prefix="lp-ws-", dir="/var/lib"))  # not under /tmp
    top.chmod(0o755)
    closed = top / "home"
    closed.mkdir(mode=0o700)
    (closed / "nb").mkdir()
    request.addfinalizer(lambda: shutil.rmtree(top))
    limits = Limits()
    plan = process_plan(limits, cgroups=[], own_uid=True, isolated=True, netns=True,
                        nice=10, cpu_grace=0, scratch_dirs=[], host_folder=True)
    ws = Workspace(str(closed / "nb"), 1000, 1000, uid_map=(1000, KERNEL_UID),
                   gid_map=(1000, KERNEL_UID))
    spec = launch_spec(limits, plan, cwd="/w", cgroup_procs=[], netns=True, nice=10,
                       uid=KERNEL_UID, gid=KERNEL_UID, isolated=True, writable=["/w"],
                       workspace=ws)
    assert spec["covers"] == [str(closed)]
    # Under a scratch dir the kernel's private tmpfs hides what is above the folder.
    in_tmp = Workspace("/tmp/closed/nb", 1000, 1000, uid_map=(1000, KERNEL_UID),
                       gid_map=(1000, KERNEL_UID))
    spec = launch_spec(limits, plan, cwd="/w", cgroup_procs=[], netns=True, nice=10,
                       uid=KERNEL_UID, gid=KERNEL_UID, isolated=True, writable=["/w"],
                       workspace=in_tmp)
    assert "covers" not in spec


def test_resolve_path_finds_files_in_the_folder_and_follows_no_link(tmp_path):
    """jupyter_server's resolvePath for a kernel: only beneath its folder, no symlink."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "hello.py").write_text("")
    (tmp_path / "link").symlink_to("/etc")
    (tmp_path / "sub" / "passwd").symlink_to("/etc/passwd")
    assert resolve_beneath(str(tmp_path), "sub/hello.py") == str(tmp_path / "sub" / "hello.py")
    assert resolve_beneath(str(tmp_path), "./sub//hello.py") == str(tmp_path / "sub" / "hello.py")
    for refused in ("link/passwd", "sub/passwd", "../x", "/etc/passwd", "missing.py", ""):
        assert resolve_beneath(str(tmp_path), refused) is None, refused
