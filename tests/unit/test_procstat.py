"""procstat.create_time: the process identity the registry compares, as psutil has it."""

from __future__ import annotations

import os
import subprocess
import time

import psutil

from limited_provisioner import procstat


def test_the_create_time_is_psutils():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        for pid in (os.getpid(), proc.pid, 1):
            assert procstat.create_time(pid) == psutil.Process(pid).create_time()
    finally:
        proc.kill()
        proc.wait()


def test_a_zombie_and_a_gone_pid_have_none():
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert procstat.create_time(proc.pid) is None
    proc.wait()
    assert procstat.create_time(proc.pid) is None
