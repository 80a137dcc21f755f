"""examples/agent_backend's files API and images, over HTTP, on both backends.

The service runs as a uvicorn subprocess on a private state dir (tests/harness.py); the
kernel is the attacker: it plants links, FIFOs and hard links in its work dir, and every
request through them must be refused without anything outside being touched. Every
service is killed by pid and every kernel of its state dir removed afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from .conftest import TEST_OWNER, backends
from .test_agent_backend import new_service, remove_everything

ALICE, BOB = TEST_OWNER, TEST_OWNER + "-b"  # docker containers are cleaned by owner label
MB = 1 << 20
BIG = 100 * 1000 * 1000  # the "100 MB"

# A 64x48 PNG drawn by code without matplotlib or PIL (neither is in the kernel image):
# what a plotting library's savefig leaves on disk.
MAKE_PNG = r"""
import hashlib, struct, zlib
def png(w, h):
    raw = b''.join(b'\x00' + b''.join(bytes((x * 4 % 256, y * 5 % 256, 128)) for x in range(w))
                   for y in range(h))
    def chunk(kind, data):
        body = kind + data
        return struct.pack('>I', len(data)) + body + struct.pack('>I', zlib.crc32(body))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))
data = png(64, 48)
"""


def _service(request, tmp_path, backend: str, **settings: str):
    kind = "docker" if "docker" in backend else "process"
    log_dir = tmp_path / f"svc-{kind}-{len(os.listdir(tmp_path))}"
    log_dir.mkdir()
    service = new_service(log_dir, BACKEND=kind, **settings)
    request.addfinalizer(lambda: remove_everything([service]))
    service.start()
    return service


@pytest.fixture(params=backends())
def service(request, tmp_path):
    """A service with a 1G disk_limit per kernel and no rate limit, on each backend."""
    if "docker" in request.param:
        request.getfixturevalue("docker_client")
    svc = _service(request, tmp_path, request.param, DISK_LIMIT="1G", RATE_LIMIT="0")
    yield svc
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(svc.logs(8000))


def url(svc, session_id: str, path: str = "") -> str:
    return f"{svc.base}/sessions/{session_id}/files" + (f"/{path}" if path else "")


def read_answer(sock: socket.socket) -> str:
    """One HTTP answer off ``sock``: its head, then its body by Content-Length (they may
    come in separate packets)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def raw_request(svc, method: str, target: str, user: str = ALICE,
                body: bytes = b"") -> tuple[int, str]:
    """One request with ``target`` sent exactly as written (no client normalizes '..')."""
    host, port = svc.base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in svc.headers(user).items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def test_100mb_upload_and_download_round_trip(service, capsys):
    payload = os.urandom(MB) * (BIG // MB) + os.urandom(BIG % MB)
    digest = hashlib.sha256(payload).hexdigest()
    # An upload starts the session's kernel (before any /exec); timed: a running one.
    assert service.client.put(url(service, "s1", "first.txt"), content=b"1",
                              headers=service.headers(ALICE)).status_code == 200
    t0 = time.perf_counter()
    resp = service.client.put(url(service, "s1", "data/big.bin"), content=payload,
                              headers=service.headers(ALICE))
    t_put = time.perf_counter() - t0
    assert resp.status_code == 200, resp.text
    assert resp.json()["size"] == BIG
    t0 = time.perf_counter()
    got = hashlib.sha256()
    n = 0
    with service.client.stream("GET", url(service, "s1", "data/big.bin"),
                               headers=service.headers(ALICE)) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-length"] == str(BIG)
        for chunk in resp.iter_raw():
            got.update(chunk)
            n += len(chunk)
    t_get = time.perf_counter() - t0
    assert (n, got.hexdigest()) == (BIG, digest)
    with capsys.disabled():
        print(f"\n100 MB round trip: PUT {t_put:.2f} s, GET {t_get:.2f} s, "
              f"total {t_put + t_get:.2f} s ({2 * BIG / MB / (t_put + t_get):.0f} MiB/s)")
    assert t_put + t_get < 30
    # The kernel sees the file where it works, as its own, with the same bytes.
    out = service.run(ALICE, "s1", (
        "import hashlib, os\nh = hashlib.sha256()\n"
        "with open('data/big.bin', 'rb') as f:\n"
        "    for b in iter(lambda: f.read(1 << 20), b''):\n        h.update(b)\n"
        "st = os.stat('data/big.bin')\n"
        "print(h.hexdigest(), st.st_uid == os.getuid(), oct(st.st_mode & 0o777))"))
    assert out["stdout"] == f"{digest} True 0o644\n"
    listing = service.client.get(url(service, "s1"), headers=service.headers(ALICE)).json()
    assert [(f["path"], f["size"]) for f in listing["files"]] == [
        ("data/big.bin", BIG), ("first.txt", 1)]
    assert service.client.delete(url(service, "s1", "data/big.bin"),
                                 headers=service.headers(ALICE)).status_code == 200
    assert service.client.get(url(service, "s1", "data/big.bin"),
                              headers=service.headers(ALICE)).status_code == 404


PLANT = """
import os
os.symlink('/etc', 'etc')
os.symlink('/etc/passwd', 'passwd')
os.mkfifo('fifo')
os.mkdir('sub')
os.symlink('/', 'sub/root')
try:
    os.link('/etc/shadow', 'shadow')
    print('hard link made')
except OSError as e:
    print('hard link refused:', e.errno)
"""


def test_paths_that_leave_the_work_dir_are_refused(service):
    out = service.run(ALICE, "s1", PLANT)
    assert out["status"] == "ok", out["text"]
    # protected_hardlinks (or another device: the kernel's own filesystem) stops it.
    assert "hard link refused" in out["stdout"]
    kernel_dir = service.state / "kernels" / out["kernel_id"]
    before = {p: p.stat().st_mtime_ns for p in kernel_dir.iterdir()}
    base = "/sessions/s1/files"
    refused = ["../x", "..%2Fx", "%2e%2e/x", "%2E%2E%2Fctl%2Fhooks.py", "a/../../x",
               "%2Fetc%2Fpasswd", "/etc/passwd", "etc/passwd", "passwd", "sub/root/etc/passwd",
               "fifo", "sub"]
    for path in refused:
        t0 = time.perf_counter()
        status, body = raw_request(service, "GET", f"{base}/{path}")
        assert status == 400, (path, status, body)
        assert time.perf_counter() - t0 < 10  # the FIFO never blocks
        status, body = raw_request(service, "PUT", f"{base}/{path}", body=b"pwned")
        assert status == 400, (path, status, body)
    for path in ("../x", "%2e%2e/x", "etc/passwd", "sub/root/etc/passwd", "sub"):
        status, body = raw_request(service, "DELETE", f"{base}/{path}")
        assert status == 400, (path, status, body)
    assert raw_request(service, "GET", f"{base}/shadow")[0] == 404
    # Nothing outside the work dir was touched: /etc, the kernel dir's own entries.
    assert not Path("/etc/x").exists() and not Path("/x").exists()
    assert "pwned" not in Path("/etc/passwd").read_text()
    assert {p: p.stat().st_mtime_ns for p in kernel_dir.iterdir() if p.name != "work"} == {
        p: t for p, t in before.items() if p.name != "work"}
    # ...and the kernel's links and FIFO are still what it made.
    out = service.run(ALICE, "s1", "import os, stat\nprint(os.readlink('etc'), os.readlink("
                      "'passwd'), stat.S_ISFIFO(os.lstat('fifo').st_mode))")
    assert out["stdout"] == "/etc /etc/passwd True\n"
    # A listing shows neither links nor FIFOs.
    listing = service.client.get(url(service, "s1"), headers=service.headers(ALICE)).json()
    assert listing["files"] == []
    # DELETE removes the kernel's own entry (the link, the FIFO), never what it names.
    for path in ("passwd", "fifo"):
        assert raw_request(service, "DELETE", f"{base}/{path}")[0] == 200
    assert Path("/etc/passwd").is_file()
    out = service.run(ALICE, "s1", "import os\nprint(sorted(n for n in os.listdir('.') "
                      "if not n.startswith('.')))")
    assert out["stdout"] == "['etc', 'sub']\n", out["stdout"]


FLIP = """
import os, shutil, threading, time
def flip():
    end = time.time() + 8
    while time.time() < end:
        try:
            os.mkdir('race')
            time.sleep(0.0005)
            shutil.rmtree('race')
            os.symlink('/etc', 'race')
            time.sleep(0.0005)
            os.unlink('race')
        except OSError:
            # An upload landed in race/ while rmtree ran: clear whatever race is now, or
            # every later mkdir fails and race stays a plain directory (no race at all).
            try:
                os.unlink('race') if os.path.islink('race') else shutil.rmtree('race')
            except OSError:
                pass
threading.Thread(target=flip, daemon=True).start()
"""


def test_links_swapped_in_while_requests_run_are_never_followed(service):
    """The kernel flips 'race' between a directory and a link to /etc as fast as it can
    while uploads and downloads go through it: each lands in the directory or is refused,
    and nothing under /etc is read or written."""
    assert service.run(ALICE, "s1", FLIP)["status"] == "ok"
    codes: dict[int, int] = {}
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        for method, path, body in (("PUT", "race/lp-race-probe", b"x"),
                                   ("GET", "race/passwd", b""), ("GET", "race/hostname", b"")):
            status, text = raw_request(service, method, f"/sessions/s1/files/{path}", body=body)
            codes[status] = codes.get(status, 0) + 1
            assert status in (200, 400, 404), (method, path, status, text)
            if method == "GET":
                assert status != 200, text  # /etc's files are never served
    assert not Path("/etc/lp-race-probe").exists()
    assert codes.get(400, 0) > 0 and sum(codes.values()) > 30, codes
    print(f"answers while the kernel flipped race/ <-> /etc: {codes}")


def test_plot_written_by_code_is_downloaded_and_displayed_image_returned(service):
    out = service.run(ALICE, "plots", MAKE_PNG + (
        "with open('plot.png', 'wb') as f:\n    f.write(data)\n"
        "from IPython.display import Image, display\n"
        "display(Image(data=data))\n"
        "print(hashlib.sha256(data).hexdigest())"))
    assert out["status"] == "ok", out["text"]
    digest = out["stdout"].strip()
    files = service.client.get(url(service, "plots"), headers=service.headers(ALICE)).json()["files"]
    assert [f["path"] for f in files] == ["plot.png"]
    resp = service.client.get(url(service, "plots", "plot.png"), headers=service.headers(ALICE))
    assert resp.status_code == 200
    assert resp.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert hashlib.sha256(resp.content).hexdigest() == digest
    # The displayed image: base64 PNG in the result, next to the text.
    (image,) = [o for o in out["outputs"] if o.get("png")]
    assert base64.b64decode(image["png"]) == resp.content
    assert "image/png" in image["mime_types"]
    assert "[image/png, " in out["text"] and "outputs[0].png]" in out["text"]


def test_another_users_session_is_not_found(service):
    assert service.client.put(url(service, "s1", "mine.txt"), content=b"alice's",
                              headers=service.headers(ALICE)).status_code == 200
    for method in ("GET", "DELETE"):
        resp = service.client.request(method, url(service, "s1", "mine.txt"),
                                      headers=service.headers(BOB))
        assert resp.status_code == 404, (method, resp.text)
        assert "no session 's1'" in resp.json()["detail"]
    assert service.client.get(url(service, "s1"), headers=service.headers(BOB)).status_code == 404
    # A refused path starts no kernel for a session that has none.
    assert raw_request(service, "PUT", "/sessions/s9/files/../x", user=BOB, body=b"x")[0] == 400
    assert service.kernels(owner=BOB) == []
    # Bob's own "s1" is another kernel: it does not see Alice's file.
    assert service.client.put(url(service, "s1", "b.txt"), content=b"bob's",
                              headers=service.headers(BOB)).status_code == 200
    files = service.client.get(url(service, "s1"), headers=service.headers(BOB)).json()["files"]
    assert [f["path"] for f in files] == ["b.txt"]
    resp = service.client.get(url(service, "s1", "mine.txt"), headers=service.headers(ALICE))
    assert resp.content == b"alice's"
    # No caller: refused like /exec.
    assert service.client.get(url(service, "s1")).status_code == 401  # no caller: authentication first


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_1g_upload_against_100m_limit_is_refused_without_filling_the_disk(
        backend, request, tmp_path):
    svc = _service(request, tmp_path, backend, DISK_LIMIT="100M", RATE_LIMIT="6")
    assert svc.client.put(url(svc, "s1", "small.txt"), content=b"x",
                          headers=svc.headers(ALICE)).status_code == 200  # starts the kernel
    free_before = shutil.disk_usage(svc.state).free

    # Announced 1 GiB: refused before the body is read (a raw socket: send 4 MiB of it).
    host, port = svc.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(("PUT /sessions/s1/files/huge.bin HTTP/1.1\r\nHost: x\r\n"
                      + "".join(f"{k}: {v}\r\n" for k, v in svc.headers(ALICE).items())
                      + f"Content-Length: {1 << 30}\r\n\r\n").encode())
        with contextlib.suppress(OSError):  # the service may close before taking it all
            sock.sendall(b"\0" * (4 * MB))
        answer = read_answer(sock)
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "disk_limit=100M" in answer and f"x-disk-limit: {100 * MB}" in answer.lower()

    # Unannounced (chunked) 1 GiB: stopped once it no longer fits.
    def gigabyte():
        block = b"\0" * MB
        for _ in range(1024):
            yield block

    t0 = time.perf_counter()
    resp = svc.client.put(url(svc, "s1", "huge.bin"), content=gigabyte(),
                          headers=svc.headers(ALICE))
    elapsed = time.perf_counter() - t0
    assert resp.status_code == 413, resp.text
    assert "disk_limit=100M" in resp.json()["detail"]
    assert resp.headers["X-Disk-Limit"] == str(100 * MB)
    # The host's disk lost at most the kernel's 100M (its sparse image), not 1G, and the
    # partial temp file is gone.
    used = free_before - shutil.disk_usage(svc.state).free
    assert used < 200 * MB, used
    listing = svc.client.get(url(svc, "s1") + "?hidden=true", headers=svc.headers(ALICE)).json()
    assert [f["path"] for f in listing["files"] if not f["path"].startswith(".ipython")] == [
        "small.txt"], listing
    out = svc.run(ALICE, "s1", "import os\nsorted(n for n in os.listdir('.') if 'upload' in n)")
    assert out["outputs"][0]["text"] == "[]"
    print(f"1 GiB chunked upload refused after {elapsed:.2f} s, host disk -{used / MB:.0f} MiB")
    # The rate limit of file requests (6/min here): the next ones get 429.
    codes = [svc.client.get(url(svc, "s1"), headers=svc.headers(ALICE)).status_code
             for _ in range(6)]
    assert codes[-1] == 429 and 200 in codes, codes

