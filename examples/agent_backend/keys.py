"""The API keys file: who may call the service, stored as hashes the operator manages.

``<state_dir>/agent-backend-keys.json`` (or ``AGENT_BACKEND_KEYS_FILE``)::

    {"version": 1, "users": {"alice": [{"id": "3f9c1a2b", "sha256": "<hex>", "created": ...}]}}

A key is ``abk_<id>_<43 url-safe characters>``: 256 random bits from :mod:`secrets`,
shown once by ``keys add`` and never stored; the file keeps the SHA-256 of the whole key.
A slow KDF (scrypt, PBKDF2) exists to make guessing a *low-entropy* password from its
hash expensive; no guessing recovers a 256-bit random key from its SHA-256, and a slow
hash on every request would hand any caller a CPU lever. ``id`` is public: it names the
key in ``keys list`` and ``keys revoke`` (and the log), so a key can be revoked without
having it.

The file is written only by this module: a fresh 0600 file beside it, renamed into place
under an ``flock``. It is read (:func:`load`) only if it is a regular file of at most
:data:`MAX_FILE_SIZE`, owned by the service's user (or root), with no group or other
permission bits, in a directory only that user (or root) can write: whoever can change
it can make themselves any user. Anything else is refused with a message saying what to
fix, and the service refuses every request meanwhile (fail closed).

CLI (``python -m agent_backend keys ...``, settings from the same ``AGENT_BACKEND_*``
variables as the service)::

    keys add USER            # prints the new key, once
    keys revoke USER [--key-id ID]
    keys list                # users and key ids, never keys
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_NAME = "agent-backend-keys.json"
VERSION = 1
# ~4,000 keys: the whole file is read at a change and every request compares against
# every hash (constant time), so it stays small.
MAX_FILE_SIZE = 1 << 20
MAX_KEY_LENGTH = 256
KEY_PREFIX = "abk"
USER = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")  # the same names as app.py's X-User
KEY_ID = re.compile(r"^[0-9a-f]{8}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class KeysFileError(Exception):
    """The keys file cannot be used as it is; the message says what to fix."""


@dataclass(frozen=True)
class KeyEntry:
    user: str
    key_id: str
    digest: bytes  # sha256 of the key
    created: float | None = None


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> tuple[str, str]:
    """A fresh ``(key_id, key)``."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


# -- reading -------------------------------------------------------------------------------


def _check_owner_and_mode(what: str, path: Path, st: os.stat_result, bits: int) -> None:
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        msg = (f"{what} {path} is owned by uid {st.st_uid}: it must belong to the "
               f"service's user (uid {uid}) or root, or that user can issue keys")
        raise KeysFileError(msg)
    if st.st_mode & bits:
        msg = (f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: "
               + ("chmod 600 it (no group or other permissions)" if bits == 0o077 else
                  "no group or other write permission (chmod go-w), or others can "
                  "replace the keys file"))
        raise KeysFileError(msg)


def file_id(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the file is replaced or rewritten; None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def load(path: Path) -> list[KeyEntry]:
    """Every key of the file; KeysFileError if it is unsafe or malformed.

    FileNotFoundError if it does not exist.
    """
    path = Path(path)
    _check_owner_and_mode("the directory of the keys file", path.parent,
                          os.stat(path.parent), 0o022)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeysFileError(f"the keys file {path} is not a regular file")
        _check_owner_and_mode("the keys file", path, st, 0o077)
        data = f.read(MAX_FILE_SIZE + 1)
    if len(data) > MAX_FILE_SIZE:
        msg = f"the keys file {path} is larger than {MAX_FILE_SIZE} bytes: revoke unused keys"
        raise KeysFileError(msg)
    return parse(data, path)


def parse(data: bytes, path: Path | str = "the keys file") -> list[KeyEntry]:
    try:
        doc = json.loads(data or b"{}")
    except ValueError as e:
        raise KeysFileError(f"{path} is not JSON: {e}") from None
    users = doc.get("users", {}) if isinstance(doc, dict) else None
    if not isinstance(users, dict) or doc.get("version", VERSION) != VERSION:
        msg = f'{path}: expected {{"version": {VERSION}, "users": {{USER: [KEY, ...]}}}}'
        raise KeysFileError(msg)
    entries = []
    for user, keys in users.items():
        if not USER.match(user) or not isinstance(keys, list):
            raise KeysFileError(f"{path}: bad user {user!r} (or its keys are not a list)")
        for k in keys:
            ok = (isinstance(k, dict) and isinstance(k.get("id"), str)
                  and KEY_ID.match(k["id"]) and isinstance(k.get("sha256"), str)
                  and SHA256.match(k["sha256"]))
            if not ok:
                msg = f"{path}: a key of {user!r} lacks an 8-hex-digit id or a sha256 hex digest"
                raise KeysFileError(msg)
            created = k.get("created")
            entries.append(KeyEntry(user, k["id"], bytes.fromhex(k["sha256"]),
                                    created if isinstance(created, int | float) else None))
    return entries


# -- writing (the CLI) ---------------------------------------------------------------------


@contextlib.contextmanager
def _editing(path: Path) -> Iterator[dict[str, Any]]:
    """The file's document, locked; written back (0600, atomically) when the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                      0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            load(path)  # refuses a file that is unsafe or malformed before editing it
            doc = json.loads(path.read_bytes() or b"{}")
        except FileNotFoundError:
            doc = {}
        doc.setdefault("version", VERSION)
        doc.setdefault("users", {})
        yield doc
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    finally:
        os.close(lock_fd)


def add_key(path: Path, user: str) -> tuple[str, str]:
    """Issue a key to ``user``; returns ``(key_id, key)``. Only the hash is stored."""
    if not USER.match(user):
        raise ValueError(f"user {user!r}: use 1-64 letters, digits or . _ @ -")
    key_id, key = new_key()
    with _editing(Path(path)) as doc:
        doc["users"].setdefault(user, []).append(
            {"id": key_id, "sha256": digest(key).hex(), "created": round(time.time())}
        )
    return key_id, key


def revoke(path: Path, user: str, key_id: str | None = None) -> list[str]:
    """Remove ``user``'s key ``key_id`` (all their keys if None); the ids removed."""
    with _editing(Path(path)) as doc:
        keys = doc["users"].get(user, [])
        gone = [k["id"] for k in keys if key_id is None or k["id"] == key_id]
        kept = [k for k in keys if k["id"] not in gone]
        if kept:
            doc["users"][user] = kept
        else:
            doc["users"].pop(user, None)
    return gone


# -- CLI -----------------------------------------------------------------------------------


def default_path() -> Path:
    from .settings import Settings

    return Path(Settings.from_env().keys_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent_backend keys",
        description="Issue, revoke and list the service's API keys (stored as SHA-256 "
        "hashes in the keys file; the service re-reads it when it changes).",
    )
    parser.add_argument("--file", type=Path, default=None,
                        help="the keys file (default: AGENT_BACKEND_KEYS_FILE, else "
                        f"<state_dir>/{FILE_NAME})")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="issue a new key to USER and print it (once)")
    add.add_argument("user")
    rev = sub.add_parser("revoke", help="revoke USER's key --key-id, or all of USER's keys")
    rev.add_argument("user")
    rev.add_argument("--key-id", default=None)
    sub.add_parser("list", help="users and key ids (never keys)")
    args = parser.parse_args(argv)
    path = args.file or default_path()
    try:
        if args.command == "add":
            key_id, key = add_key(path, args.user)
            print(key)
            print(f"key {key_id} issued to {args.user!r} in {path}; it is shown only this "
                  "once. Send it as 'Authorization: Bearer <key>' with 'X-User: "
                  f"{args.user}'.", file=sys.stderr)
        elif args.command == "revoke":
            gone = revoke(path, args.user, args.key_id)
            if not gone:
                which = f"key {args.key_id} of " if args.key_id else "keys of "
                print(f"no {which}{args.user!r} in {path}", file=sys.stderr)
                return 1
            print(f"revoked {', '.join(gone)} of {args.user!r}", file=sys.stderr)
        else:
            try:
                entries = load(path)
            except FileNotFoundError:
                entries = []
            for e in entries:
                created = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.created))
                           if e.created else "-")
                print(f"{e.user}\t{e.key_id}\t{created}")
    except (KeysFileError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
