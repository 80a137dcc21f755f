"""Files kept after an idle cull (limited_provisioner/kept_files.py) as rules: whose they
are, when they expire, what the reaper removes, the owner's budget, and that handing
them to the next kernel follows no link the old kernel planted. Plain directories only:
nothing is mounted and no kernel runs here (tests/test_keep_files.py does that)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from limited_provisioner import kept_files
from limited_provisioner.kernel_dir import KernelDir
from limited_provisioner.settings import LimitedSettings

OWNER, LABEL = "alice", "session_id"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "kernels").mkdir(mode=0o711)
    return state


def culled_kernel(state: Path, kernel_id: str, files: dict[str, bytes],
                  uid: int | None = None) -> KernelDir:
    """A kernel dir as a culled kernel leaves it (its processes gone)."""
    kdir = KernelDir(state / "kernels", kernel_id, uid, uid)
    kdir.create()
    for name, data in files.items():
        path = kdir.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if uid is not None:
            os.chown(path, uid, uid)
    return kdir


def keep(state: Path, kdir: KernelDir, value: str, keep_for: float = 60, owner: str = OWNER,
         budget: int | None = None, now: float | None = None) -> dict:
    return kept_files.keep(kdir, state_dir=state, owner=owner, label=LABEL, value=value,
                           keep_for=keep_for, budget=budget, image_bytes=None, now=now)


# -- keys and times ---------------------------------------------------------------------

def test_the_key_is_owner_label_and_value_and_nothing_else():
    assert kept_files.kept_id("a", "s", "1") == kept_files.kept_id("a", "s", "1")
    ids = {kept_files.kept_id(*k) for k in
           [("a", "s", "1"), ("b", "s", "1"), ("a", "t", "1"), ("a", "s", "2"),
            ("a\x00s", "", "1"), ("a", "s\x001", "")]}
    assert len(ids) == 6
    meta = {"owner": "a", "label": "s", "value": "1"}
    assert kept_files.matches(meta, "a", "s", "1")
    assert not kept_files.matches(meta, "b", "s", "1")
    assert not kept_files.matches(meta, "a", "s", "2")


def test_kept_files_expire_at_their_time_and_a_meta_without_one_has_expired():
    assert not kept_files.expired({"expires": 100.0}, 99.9)
    assert kept_files.expired({"expires": 100.0}, 100.0)
    assert kept_files.expired({}, 0)
    assert kept_files.expired({"expires": "soon"}, 0)


def test_a_half_done_step_is_stale_only_after_stale_after_or_if_not_ours():
    now = time.time()
    assert not kept_files.stale(kept_files._step_name("claim", now), now + 5)
    assert kept_files.stale(kept_files._step_name("claim", now),
                            now + kept_files.STALE_AFTER + 1)
    assert kept_files.stale(".whatever", now)


def test_keep_files_for_parses_like_the_other_durations():
    settings = LimitedSettings(keep_files_for="1h", kept_files_budget="2G")
    assert settings.keep_files_for == 3600.0
    assert settings.kept_files_budget == 2 * 2**30
    assert LimitedSettings().keep_files_for == 0
    assert LimitedSettings().keep_files_label == "session_id"


def test_only_an_idle_cull_keeps_files():
    assert kept_files.kept_after("cull", "idle_timeout")
    assert not kept_files.kept_after("cull", "max_lifetime")
    assert not kept_files.kept_after("restart", "exec_timeout")
    assert not kept_files.kept_after("interrupt", "exec_timeout")


@pytest.mark.parametrize("where", ["kernelspec", "config"])
def test_a_kernel_keeps_files_under_its_owner_and_label_when_keep_files_for_is_set(where):
    from traitlets.config import Config

    from limited_provisioner import LimitedHost, LimitedProcessProvisioner

    LimitedHost.clear_instance()
    settings = {"keep_files_for": "30m", "owner": "alice", "labels": {"session_id": "c1"}}
    if where == "kernelspec":  # metadata.kernel_provisioner.config: trait values
        prov = LimitedProcessProvisioner(kernel_id="k", kernel_spec=None, **settings)
    else:  # c.LimitedProvisioner.keep_files_for
        c = Config()
        for name, value in settings.items():
            setattr(c.LimitedProvisioner, name, value)
        prov = LimitedProcessProvisioner(config=c, kernel_id="k", kernel_spec=None)
    assert prov.keep_files_for == 1800.0
    assert prov._keep_files_key() == ("alice", "session_id", "c1")
    prov.labels = {"other": "x"}
    assert prov._keep_files_key() is None  # no session label: nothing to come back to
    prov.labels = {"session_id": "c1"}
    prov.keep_files_for = 0
    assert prov._keep_files_key() is None
    LimitedHost.clear_instance()


# -- keep, claim, forget, reap ---------------------------------------------------------

def test_kept_files_go_to_the_same_owner_and_session_only(state):
    kdir = culled_kernel(state, "k1", {"a.txt": b"hello", "sub/b.bin": b"\x00" * 10})
    meta = keep(state, kdir, "chat-1")
    assert (meta["kind"], meta["owner"], meta["value"]) == ("dir", OWNER, "chat-1")
    assert not kdir.work.exists()  # moved, not copied
    kdir.remove()
    assert kept_files.claim(state, "mallory", LABEL, "chat-1") is None
    assert kept_files.claim(state, OWNER, LABEL, "chat-2") is None
    assert kept_files.claim(state, OWNER, "other", "chat-1") is None

    new = culled_kernel(state, "k2", {})
    claimed = kept_files.claim(state, OWNER, LABEL, "chat-1")
    assert claimed is not None and claimed.kind == "dir"
    # A second start of the same session finds nothing while the first holds them.
    assert kept_files.claim(state, OWNER, LABEL, "chat-1") is None
    new.take_work(claimed.dir_fd, kept_files.WORK, claimed.old_identity)
    claimed.used = True
    claimed.settle()
    assert (new.work / "a.txt").read_bytes() == b"hello"
    assert (new.work / "sub" / "b.bin").read_bytes() == b"\x00" * 10
    assert os.listdir(state / "kept") == []


def test_an_unused_claim_goes_back_until_it_expires(state):
    keep(state, culled_kernel(state, "k1", {"a": b"1"}), "s")
    claimed = kept_files.claim(state, OWNER, LABEL, "s")
    assert claimed is not None
    claimed.settle()  # the new kernel's disk settings did not fit them
    assert [m["value"] for m in kept_files.entries(state)] == ["s"]


def test_expired_files_are_not_given_back_and_the_reaper_removes_them(state):
    now = time.time()
    keep(state, culled_kernel(state, "k1", {"a": b"1"}), "old", keep_for=10, now=now - 20)
    keep(state, culled_kernel(state, "k2", {"a": b"2"}), "young", keep_for=60, now=now)
    keep(state, culled_kernel(state, "k3", {"a": b"3"}), "late", keep_for=10, now=now - 20)
    assert kept_files.claim(state, OWNER, LABEL, "late", now=now) is None  # and removed
    removed = kept_files.reap_kept(state, now=now)
    assert len(removed) == 1
    assert [m["value"] for m in kept_files.entries(state)] == ["young"]
    assert len(os.listdir(state / "kept")) == 1


def test_the_reaper_removes_what_a_crash_left_half_done_and_leaves_a_live_claim(state):
    now = time.time()
    root = state / "kept"
    root.mkdir(mode=0o700)
    crashed = root / kept_files._step_name("claim", now - kept_files.STALE_AFTER - 5)
    live = root / kept_files._step_name("claim", now)
    for d in (crashed, live):
        (d / "work").mkdir(parents=True)
    kept_files.reap_kept(state, now=now)
    assert sorted(os.listdir(root)) == [live.name]


def test_forget_deletes_them_at_once(state):
    keep(state, culled_kernel(state, "k1", {"a": b"1"}), "s")
    assert kept_files.forget(state, OWNER, LABEL, "s")["kernel_id"] == "k1"
    assert kept_files.forget(state, OWNER, LABEL, "s") is None
    assert os.listdir(state / "kept") == []


def test_a_second_cull_of_the_session_replaces_what_the_first_kept(state):
    keep(state, culled_kernel(state, "k1", {"a": b"first"}), "s")
    keep(state, culled_kernel(state, "k2", {"a": b"second"}), "s")
    (meta,) = kept_files.entries(state)
    assert meta["kernel_id"] == "k2"
    assert len(os.listdir(state / "kept")) == 1


def test_the_owners_budget_evicts_its_oldest_kept_files_first(state):
    block = b"x" * 200_000
    keep(state, culled_kernel(state, "k1", {"a": block}), "s1", budget=500_000,
         now=time.time() - 2)
    keep(state, culled_kernel(state, "b1", {"a": block}), "s1", owner="bob", budget=500_000)
    keep(state, culled_kernel(state, "k2", {"a": block}), "s2", budget=500_000,
         now=time.time() - 1)
    keep(state, culled_kernel(state, "k3", {"a": block}), "s3", budget=500_000)
    mine = sorted(m["value"] for m in kept_files.entries(state) if m["owner"] == OWNER)
    assert mine == ["s2", "s3"]
    assert kept_files.usage(state, "bob") > 0  # another owner's are not touched
    big = culled_kernel(state, "k4", {"a": block * 3})
    with pytest.raises(kept_files.KeepError, match="kept_files_budget"):
        keep(state, big, "s4", budget=500_000)
    assert (big.work / "a").exists()  # left for the kernel dir's removal


# -- handing them over -----------------------------------------------------------------

@root_only
def test_handing_over_follows_no_link_and_changes_only_the_old_kernels_files(state, tmp_path):
    old_uid, new_uid, stranger = 64990, 64991, 64992
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("root's")
    theirs = outside / "theirs"
    theirs.write_text("someone else's")
    os.chown(theirs, stranger, stranger)
    kdir = culled_kernel(state, "k1", {"mine": b"1", "d/deep": b"2"}, uid=old_uid)
    os.symlink(victim, kdir.work / "link")
    os.symlink(outside, kdir.work / "dirlink")
    os.link(theirs, kdir.work / "hardlink")
    os.mkfifo(kdir.work / "fifo")
    os.chown(kdir.work / "fifo", old_uid, old_uid)
    os.lchown(kdir.work / "link", old_uid, old_uid)
    os.chown(kdir.work / "d", old_uid, old_uid)
    keep(state, kdir, "s")
    kdir.remove()

    new = culled_kernel(state, "k2", {}, uid=new_uid)
    claimed = kept_files.claim(state, OWNER, LABEL, "s")
    new.take_work(claimed.dir_fd, kept_files.WORK, claimed.old_identity)
    claimed.used = True
    claimed.settle()
    work = new.work
    for name in ("mine", "d", "d/deep", "fifo", "link"):
        assert os.lstat(work / name).st_uid == new_uid, name
    assert stat.S_ISFIFO(os.lstat(work / "fifo").st_mode)
    assert os.stat(work).st_uid == new_uid
    # Neither a symlink's target nor a hard link to another uid's file changed hands.
    assert (os.stat(victim).st_uid, os.stat(outside).st_uid) == (0, 0)
    assert os.stat(theirs).st_uid == stranger
