"""The attack catalogue: the seed report's scenarios 1.1-3.7 (../shared/seeds/004_*.txt,
"real attack" sizes, not the report's safe PoCs) plus the ones it missed.

Each attack says what a contained outcome looks like: ``stopped_by`` maps each mechanism
that may stop it to a regex the evidence of that mechanism must match. An attack that
runs to completion without one of them acting proves nothing (or means a limit did not
act), and fails. The mechanisms, and their evidence:

* REFUSED: the operation failed inside the kernel (MemoryError from the data rlimit,
  EAGAIN / EMFILE / EFBIG / ENOSPC / ENAMETOOLONG...): the cell's error.
* INTERRUPTED: exec_timeout interrupted the cell: the cell's error, a TimeoutError
  naming exec_timeout.
* KILLED: the kernel was killed or restarted by a limit (cgroup OOM kill, the
  watchdog's disk / files limits, exec_timeout's restart after the grace period): the
  reasons the provisioner recorded (a death without one is a crash, not containment).

Where the kernel's dirs are a filesystem of its own (workfs.py: what the host gives a
root server with loop devices), disk and files limits are no longer the watchdog's: an
attack with ``own_fs`` expectations must then be stopped by one of those instead (the
write refused, ENOSPC; no kill, nothing over the limit).
* CAPPED: output past output_limit was dropped, with the limit's notice; the cell may
  then end normally: the notice in the output.
* EACH_REFUSED: the code makes ``attempts`` attempts and reports each on a line,
  ``refused: <target>: <error>`` or ``ALLOWED: <target>``; every attempt must be
  refused: each ``refused:`` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REFUSED = "refused in the kernel"
INTERRUPTED = "interrupted by exec_timeout"
KILLED = "killed or restarted by a limit"
CAPPED = "output capped"
EACH_REFUSED = "every attempt refused"


@dataclass(frozen=True)
class Attack:
    id: str
    title: str
    code: str
    # How it may be stopped -> a regex the evidence of that mechanism must match.
    stopped_by: dict[str, str]
    attempts: int = 0  # EACH_REFUSED: how many attempts the code reports
    needs: str = ""  # "numpy" / "pandas": skipped where the kernel cannot import it
    # stopped_by when the kernel has its own filesystem (disk_limit enforced by it).
    own_fs: dict[str, str] | None = None
    # Limits of its own over the suite's (the test's LIMITS).
    limits: dict[str, object] = field(default_factory=dict)

    def expected(self, own_fs: bool) -> dict[str, str]:
        return self.own_fs if own_fs and self.own_fs is not None else self.stopped_by


TIMEOUT = r"exec_timeout"
# The allocation refused (data rlimit: MemoryError; mmap: ENOMEM), or the kernel
# OOM-killed by its memory cgroup.
MEMORY = {REFUSED: r"MemoryError|Cannot allocate memory", KILLED: r"memory limit"}
# Growth that may be slower than exec_timeout: also the interrupt, or the restart when the
# growth sits in C code that does not take the interrupt in time (pandas under gVisor's
# ptrace platform on a loaded box).
MEMORY_OR_TIME = {**MEMORY, INTERRUPTED: TIMEOUT, KILLED: f"{MEMORY[KILLED]}|{TIMEOUT}"}
# exec_timeout: the interrupt, or the restart when the code does not take it in time.
TIME = {INTERRUPTED: TIMEOUT, KILLED: TIMEOUT}

CATALOGUE = [
    # -- 1. memory -----------------------------------------------------------------
    Attack("1.1", "large list 8 GB", "x = [0] * (10**9)", MEMORY),
    Attack("1.2", "large string 1 GB", "s = 'A' * (10**9)", MEMORY),
    Attack("1.3", "numpy 80 GB array", "import numpy as np\narr = np.zeros((10**5, 10**5))\n"
           "arr[:] = 1", MEMORY, needs="numpy"),
    Attack("1.4", "pandas doubling x30",
           "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\n"
           "for i in range(30):\n    df = pd.concat([df, df], ignore_index=True)",
           MEMORY_OR_TIME, needs="pandas"),
    Attack("1.5", "recursive structure growth",
           "x = []\nwhile True:\n    x = [x, bytearray(b'x' * 4096)]", MEMORY_OR_TIME),
    # -- 2. CPU --------------------------------------------------------------------
    Attack("2.1", "infinite loop", "while True:\n    x = 1 + 1", TIME),
    Attack("2.2", "300 s CPU burn",
           "import time\nstart = time.time()\ncount = 0\nwhile time.time() - start < 300:\n"
           "    count += 1", TIME),
    Attack("2.3", "primes to 10^7",
           "def primes(n):\n    return [p for p in range(2, n) if all(p % d for d in "
           "range(2, int(p ** 0.5) + 1))]\nprimes(10**7)", TIME),
    Attack("2.4", "O(n^3) n=1000",
           "count = 0\nfor i in range(1000):\n    for j in range(1000):\n"
           "        for k in range(1000):\n            count += 1", TIME),
    Attack("2.5", "matmul 5000x5000",
           "import numpy as np\nA = np.random.rand(5000, 5000)\nB = np.random.rand(5000, 5000)\n"
           "C = A @ B", MEMORY_OR_TIME, needs="numpy"),
    Attack("2.6", "regex catastrophic backtracking",
           "import re\nre.match(r'^(a+)+$', 'a' * 40 + 'b')", TIME),
    # -- 3. disk and descriptors ---------------------------------------------------
    Attack("3.1", "100 x 100 MB files",
           "for i in range(1000):\n    with open(f'file_{i}.bin', 'wb') as f:\n"
           "        f.write(b'X' * (100 * 1024**2))",
           {REFUSED: r"File too large", KILLED: r"disk limit"},
           own_fs={REFUSED: r"No space left on device"}),
    Attack("3.2", "1,000,000 small files (inodes)",
           "from pathlib import Path\nfor i in range(10**6):\n"
           "    Path(f'file_{i}.txt').write_text('data')",
           {KILLED: r"files limit", REFUSED: r"No space left", INTERRUPTED: TIMEOUT},
           own_fs={REFUSED: r"No space left on device"},
           # Fewer inodes than the suite's 2000: under gVisor every file is a round trip
           # to its gofer (~0.6 ms idle, 2-3x that on a loaded CI machine), and 2000 of
           # them raced exec_timeout=3s; the attack's point -- its own filesystem runs
           # out of inodes and says so -- does not depend on the count.
           limits={"files_limit": 500}),
    Attack("3.3", "10,000-level directory nesting",
           "from pathlib import Path\ncurrent = Path('nested')\nfor i in range(10000):\n"
           "    current = current / f'level_{i}'\ncurrent.mkdir(parents=True)",
           {REFUSED: r"File name too long", KILLED: r"files limit"}),
    Attack("3.4", "sparse file 1 TB",
           "with open('sparse.bin', 'wb') as f:\n    f.seek(1024**4 - 1)\n    f.write(b'X')",
           {REFUSED: r"File too large"}),
    Attack("3.5", "10,000 open files",
           "files = [open(f'fd_{i}.txt', 'w') for i in range(10000)]",
           {REFUSED: r"Too many open files"}),
    Attack("3.6", "10,000 sockets",
           "import socket\nsockets = [socket.socket() for i in range(10000)]",
           {REFUSED: r"Too many open files"}),
    Attack("3.7", "temp file accumulation in /tmp",
           "import tempfile\nfor i in range(10**6):\n"
           "    f = tempfile.NamedTemporaryFile(delete=False)\n    f.write(b'data' * 1024)\n"
           "    f.close()",
           {REFUSED: r"No space left", KILLED: r"files limit", INTERRUPTED: TIMEOUT}),
    # -- beyond the seed -----------------------------------------------------------
    Attack("x.1", "fork bomb", "import os\nwhile True:\n    os.fork()",
           # fork() refused (EAGAIN at the pids limit), or the kernel OOM-killed first; on a
           # loaded box exec_timeout may come first, and the kernel dies at its interrupt.
           {REFUSED: r"Resource temporarily unavailable",
            KILLED: rf"pids limit|memory limit|{TIMEOUT}"}),
    Attack("x.2", "thread bomb",
           "import threading, time\nwhile True:\n"
           "    threading.Thread(target=time.sleep, args=(300,), daemon=True).start()",
           # On docker the kernel sometimes stays in the cell once its pids are used up
           # (about half the runs since the proxy; cause not found yet): exec_timeout
           # then stops it. Contained either way; the reason shown differs.
           {REFUSED: r"can't start new thread|Resource temporarily unavailable",
            INTERRUPTED: TIMEOUT, KILLED: r"pids limit|exec_timeout"}),
    Attack("x.3", "/dev/shm fill",
           "with open('/dev/shm/fill', 'wb') as f:\n    for i in range(10**4):\n"
           "        f.write(b'x' * 2**20)",
           {REFUSED: r"No space left|File too large|MemoryError|Cannot allocate memory",
            KILLED: r"memory limit"}),
    Attack("x.4", "anonymous shared mmap 4 GB",
           "import mmap\nm = mmap.mmap(-1, 4 * 1024**3)\nfor i in range(0, len(m), 4096):\n"
           "    m[i] = 1", MEMORY),
    # Each attempt reports itself: "refused: <target>: <error>" or "ALLOWED: <target>".
    Attack("x.5", "outbound network",
           "import socket\nfor addr in [('1.1.1.1', 53), ('172.17.0.1', 80), ('10.0.0.1', 80)]:\n"
           "    try:\n        socket.create_connection(addr, timeout=3).close()\n"
           "        print('ALLOWED: connect', addr)\n"
           "    except OSError as e:\n        print(f'refused: connect {addr}: {e}')",
           {EACH_REFUSED: r"Network is unreachable|No route to host"}, attempts=3),
    Attack("x.6", "writing outside the work dir",
           "for path in ['/etc/limited-pwned', '/usr/limited-pwned', '/var/lib/limited-pwned',"
           " '/root/limited-pwned']:\n    try:\n        open(path, 'w').write('x')\n"
           "        print('ALLOWED: write', path)\n"
           "    except OSError as e:\n        print(f'refused: write {path}: {e}')",
           {EACH_REFUSED: r"Permission denied|Read-only file system"}, attempts=4),
    # Hidden (not there in the kernel's view) counts as refused: nothing was read.
    Attack("x.7", "reading host secrets",
           "import os\nfor how, path in [('read', '/etc/shadow'), ('read', '/root/.bash_history'),"
           " ('read', '__OTHER_KERNEL_CONNECTION_FILE__'), ('list', '__REGISTRY_DIR__'),"
           " ('read', '__REGISTRY_DIR__/__OTHER_KERNEL_ID__.json')]:\n"
           "    try:\n        os.listdir(path) if how == 'list' else open(path).read(1)\n"
           "        print('ALLOWED:', how, path)\n"
           "    except OSError as e:\n        print(f'refused: {how} {path}: {e}')",
           {EACH_REFUSED: r"Permission denied|No such file or directory"}, attempts=5),
    Attack("x.8", "output flood 100 MB",
           "for i in range(100):\n    print('x' * 2**20)", {CAPPED: r"output limit"}),
]
