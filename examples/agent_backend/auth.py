"""Who is calling: API keys (the default), or ``X-User`` from a trusted proxy.

Three modes, decided by the operator and logged at start:

* ``api_keys`` (default): every request carries ``Authorization: Bearer <key>``; the key
  must be one the keys file (:mod:`.keys`) holds for the user named in ``X-User``. A key
  alone is enough (the user is the key's); ``X-User``, when sent, must name that user.
* ``trusted_proxy`` (``AGENT_BACKEND_TRUST_X_USER=1``): an authenticating proxy in front
  sets ``X-User``; it is taken as given and the keys file is not read.
* ``unconfigured``: ``api_keys`` while the keys file does not exist yet. Every request
  (except ``/health``) is refused with 401 naming both ways to configure it; the first
  ``keys add`` turns keys on without a restart.

The keys file is re-read when it changes (device, inode, mtime, size), so ``keys add``
and ``keys revoke`` take effect at the next request. A key is compared, in constant time,
against every hash of the file whoever the caller claims to be, so the time taken says
neither which users have keys nor how many. Keys are never logged; key ids are.
"""

from __future__ import annotations

import hmac
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from . import keys as keyfile
from .keys import KeyEntry, KeysFileError

log = logging.getLogger("agent_backend.auth")

API_KEYS, TRUSTED_PROXY, UNCONFIGURED = "api_keys", "trusted_proxy", "unconfigured"
BEARER = 'Bearer realm="agent_backend"'


@dataclass
class Refusal(Exception):
    """The request is not authenticated: HTTP ``status`` with ``message`` and headers."""

    status: int
    message: str
    error: str | None = None  # RFC 6750 error code for WWW-Authenticate

    def headers(self) -> dict[str, str]:
        if self.status != 401:
            return {}
        value = BEARER + (f', error="{self.error}"' if self.error else "")
        return {"WWW-Authenticate": value}


def verify(entries: list[KeyEntry], key: str) -> KeyEntry | None:
    """The entry whose hash is the key's, or None.

    Compares with :func:`hmac.compare_digest` against *every* entry, without stopping
    at a match, so the time depends only on the number of keys in the file.
    """
    candidate = keyfile.digest(key)
    found = None
    for entry in entries:
        if hmac.compare_digest(entry.digest, candidate):
            found = entry
    return found


def unconfigured_message(path: Path | str) -> str:
    return (
        "authentication is not configured: issue API keys with 'python -m agent_backend "
        f"keys add USER' (keys file {path}) and send 'Authorization: Bearer <key>', or, "
        "behind an authenticating proxy that sets X-User, start the service with "
        "AGENT_BACKEND_TRUST_X_USER=1"
    )


class Authenticator:
    """The caller of each request, for app.py's ``current_user`` dependency.

    Thread-safe: the dependency runs in FastAPI's thread pool (the keys file is read
    and hashes compared off the event loop).
    """

    def __init__(self, keys_path: Path | str, trust_x_user: bool = False):
        self.path = Path(keys_path)
        self.trust_x_user = trust_x_user
        self._lock = threading.Lock()
        self._file_id: tuple[int, int, int, int] | None = None
        self._entries: list[KeyEntry] = []
        self._error: str | None = None

    @property
    def mode(self) -> str:
        if self.trust_x_user:
            return TRUSTED_PROXY
        return API_KEYS if keyfile.file_id(self.path) is not None else UNCONFIGURED

    def start(self) -> str:
        """Check the configuration at service start; one line for the log saying the mode.

        An unusable keys file (unsafe owner or mode, not JSON, too large) stops the start
        (KeysFileError): the operator is there to fix it. Should it become unusable
        while the service runs, every request is refused with 503 until it is fixed.
        """
        if self.trust_x_user:
            return ("auth mode trusted_proxy (AGENT_BACKEND_TRUST_X_USER=1): X-User is "
                    "taken as given; only an authenticating proxy may reach this service")
        try:
            entries = self._current()
        except Refusal as e:
            raise KeysFileError(e.message) from None
        if entries is None:
            return (f"auth mode unconfigured: no keys file at {self.path}, so every "
                    f"request except /health is refused; {unconfigured_message(self.path)}")
        users = len({e.user for e in entries})
        return f"auth mode api_keys: {len(entries)} key(s) of {users} user(s) in {self.path}"

    def _current(self) -> list[KeyEntry] | None:
        """The file's keys, re-read if it changed; None if it does not exist."""
        with self._lock:
            file_id = keyfile.file_id(self.path)
            if file_id is None:
                self._file_id, self._entries, self._error = None, [], None
                return None
            if file_id != self._file_id:
                try:
                    self._entries, self._error = keyfile.load(self.path), None
                    log.info("keys file %s read: %d key(s)", self.path, len(self._entries))
                except FileNotFoundError:  # removed between the stat and the open
                    return None
                except (KeysFileError, OSError) as e:
                    self._entries, self._error = [], str(e)
                    log.error("keys file unusable, refusing every request: %s", e)
                self._file_id = file_id
            if self._error is not None:
                raise Refusal(503, f"the service's keys file is unusable: {self._error}")
            return self._entries

    def authenticate(self, x_user: str | None, authorization: str | None) -> str:
        """The calling user, or :class:`Refusal`. ``x_user`` is already well-formed."""
        if self.trust_x_user:
            if x_user is None:
                msg = "missing X-User header (set by the authenticating proxy in front)"
                raise Refusal(401, msg)
            return x_user
        entries = self._current()
        if entries is None:
            raise Refusal(401, unconfigured_message(self.path))
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if not authorization:
            raise Refusal(401, "missing 'Authorization: Bearer <key>' header (an API key "
                          "issued with 'python -m agent_backend keys add USER')")
        if scheme.lower() != "bearer" or not key:
            raise Refusal(401, "the Authorization header must be 'Bearer <key>'",
                          "invalid_request")
        entry = verify(entries, key) if len(key) <= keyfile.MAX_KEY_LENGTH else None
        if entry is None or (x_user is not None and entry.user != x_user):
            # The same answer for an unknown key and another user's key: nothing says
            # whether the key exists or whom it belongs to.
            who = f" of user {x_user!r}" if x_user is not None else ""
            log.info("refused a request%s: not a valid key", who)
            raise Refusal(401, f"invalid API key{who} (revoked, mistyped, or issued to "
                          "another user)", "invalid_token")
        return entry.user
