"""The attack catalogue: the seed report's scenarios 1.1-3.7 (../shared/seeds/004_*.txt,
"real attack" sizes, not the report's safe PoCs) plus the ones it missed.

Each attack says what a contained outcome looks like: ``expect`` is a regex the words
the user sees must match (cell error, output, or the provisioner's recorded reason).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Attack:
    id: str
    title: str
    code: str
    expect: str
    needs: str = ""  # "numpy" / "pandas": skipped where the kernel cannot import it


MEMORY = r"MemoryError|memory limit|Cannot allocate memory"
TIMEOUT = r"exec_timeout"

CATALOGUE = [
    # -- 1. memory -----------------------------------------------------------------
    Attack("1.1", "large list 8 GB", "x = [0] * (10**9)", MEMORY),
    Attack("1.2", "large string 1 GB", "s = 'A' * (10**9)", MEMORY),
    Attack("1.3", "numpy 80 GB array", "import numpy as np\narr = np.zeros((10**5, 10**5))\n"
           "arr[:] = 1", MEMORY, needs="numpy"),
    Attack("1.4", "pandas doubling x30",
           "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\n"
           "for i in range(30):\n    df = pd.concat([df, df], ignore_index=True)",
           MEMORY + "|" + TIMEOUT, needs="pandas"),
    Attack("1.5", "recursive structure growth",
           "x = []\nwhile True:\n    x = [x, bytearray(b'x' * 4096)]", MEMORY + "|" + TIMEOUT),
    # -- 2. CPU --------------------------------------------------------------------
    Attack("2.1", "infinite loop", "while True:\n    x = 1 + 1", TIMEOUT),
    Attack("2.2", "300 s CPU burn",
           "import time\nstart = time.time()\ncount = 0\nwhile time.time() - start < 300:\n"
           "    count += 1", TIMEOUT),
    Attack("2.3", "primes to 10^7",
           "def primes(n):\n    return [p for p in range(2, n) if all(p % d for d in "
           "range(2, int(p ** 0.5) + 1))]\nprimes(10**7)", TIMEOUT),
    Attack("2.4", "O(n^3) n=1000",
           "count = 0\nfor i in range(1000):\n    for j in range(1000):\n"
           "        for k in range(1000):\n            count += 1", TIMEOUT),
    Attack("2.5", "matmul 5000x5000",
           "import numpy as np\nA = np.random.rand(5000, 5000)\nB = np.random.rand(5000, 5000)\n"
           "C = A @ B", MEMORY + "|" + TIMEOUT, needs="numpy"),
    Attack("2.6", "regex catastrophic backtracking",
           "import re\nre.match(r'^(a+)+$', 'a' * 40 + 'b')", TIMEOUT),
    # -- 3. disk and descriptors ---------------------------------------------------
    Attack("3.1", "100 x 100 MB files",
           "for i in range(1000):\n    with open(f'file_{i}.bin', 'wb') as f:\n"
           "        f.write(b'X' * (100 * 1024**2))", r"File too large|disk limit"),
    Attack("3.2", "1,000,000 small files (inodes)",
           "from pathlib import Path\nfor i in range(10**6):\n"
           "    Path(f'file_{i}.txt').write_text('data')",
           r"files limit|No space left|" + TIMEOUT),
    Attack("3.3", "10,000-level directory nesting",
           "from pathlib import Path\ncurrent = Path('nested')\nfor i in range(10000):\n"
           "    current = current / f'level_{i}'\ncurrent.mkdir(parents=True)",
           r"File name too long|files limit"),
    Attack("3.4", "sparse file 1 TB",
           "with open('sparse.bin', 'wb') as f:\n    f.seek(1024**4 - 1)\n    f.write(b'X')",
           r"File too large"),
    Attack("3.5", "10,000 open files",
           "files = [open(f'fd_{i}.txt', 'w') for i in range(10000)]",
           r"Too many open files"),
    Attack("3.6", "10,000 sockets",
           "import socket\nsockets = [socket.socket() for i in range(10000)]",
           r"Too many open files"),
    Attack("3.7", "temp file accumulation in /tmp",
           "import tempfile\nfor i in range(10**6):\n"
           "    f = tempfile.NamedTemporaryFile(delete=False)\n    f.write(b'data' * 1024)\n"
           "    f.close()", r"No space left|files limit|" + TIMEOUT),
    # -- beyond the seed -----------------------------------------------------------
    Attack("x.1", "fork bomb", "import os\nwhile True:\n    os.fork()",
           r"Resource temporarily unavailable|pids limit|memory limit"),
    Attack("x.2", "thread bomb",
           "import threading, time\nwhile True:\n"
           "    threading.Thread(target=time.sleep, args=(300,), daemon=True).start()",
           # On docker the kernel sometimes stays in the cell once its pids are used up
           # (about half the runs since the proxy; cause not found yet): exec_timeout
           # then stops it. Contained either way; the reason shown differs.
           r"can't start new thread|Resource temporarily unavailable|pids limit|exec_timeout"),
    Attack("x.3", "/dev/shm fill",
           "with open('/dev/shm/fill', 'wb') as f:\n    for i in range(10**4):\n"
           "        f.write(b'x' * 2**20)", r"No space left|File too large|" + MEMORY),
    Attack("x.4", "anonymous shared mmap 4 GB",
           "import mmap\nm = mmap.mmap(-1, 4 * 1024**3)\nfor i in range(0, len(m), 4096):\n"
           "    m[i] = 1", MEMORY),
    Attack("x.5", "outbound network",
           "import socket\nfor addr in [('1.1.1.1', 53), ('172.17.0.1', 80), ('10.0.0.1', 80)]:\n"
           "    try:\n        socket.create_connection(addr, timeout=3)\n"
           "        print('CONNECTED', addr)\n    except OSError as e:\n        print('blocked', e)\n"
           "raise ConnectionError('no connection possible')",
           r"Network is unreachable|no connection possible"),
    Attack("x.6", "writing outside the work dir",
           "import os\nfor path in ['/etc/limited-pwned', '/usr/limited-pwned', '/var/lib/limited-pwned',"
           " '/root/limited-pwned']:\n    try:\n        open(path, 'w').write('x')\n"
           "        print('WROTE', path)\n    except OSError as e:\n        print('refused', path, e)\n"
           "raise PermissionError('nothing written outside')", r"nothing written outside"),
    Attack("x.7", "reading host secrets",
           "import glob\nfound = []\nfor path in ['/etc/shadow', '/root/.bash_history', "
           "'__OTHER_KERNEL_CONNECTION_FILE__', "
           "*glob.glob('/var/lib/limited-provisioner/registry/*')]:\n"
           "    try:\n        open(path).read(1)\n        found.append(path)\n"
           "    except OSError:\n        pass\n"
           "raise PermissionError(f'readable host secrets: {found}')",
           r"readable host secrets: \[\]"),
    Attack("x.8", "output flood 100 MB",
           "for i in range(100):\n    print('x' * 2**20)", r"output limit"),
]
