"""Who is looking at the board: accounts, sessions, CSRF tokens, the login rate limit.

Accounts live in ``board.users_file``, one ``name:hash`` a line (argon2id, written by
``edge-agent board add-user``); the file is read at each login, so an added account works
without a restart. With ``board.auth = "proxy"`` a trusted reverse proxy has authenticated
the user and names them in a header; the board still gives the browser its own session
(cookie + CSRF token), so a state change always needs the token.

Sessions are held in memory: a restart of the board asks users to log in again, and loses
nothing else.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..errors import ConfigError

logger = logging.getLogger(__name__)

USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
"""Names that are safe in a log line, an ack payload and the users file."""
MAX_PASSWORD_CHARS = 1024

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


def valid_user_name(name: str) -> bool:
    return USER_NAME.fullmatch(name) is not None


def read_users(path: Path) -> dict[str, str]:
    """name → hash; a missing file is no accounts (logged), malformed lines are skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        logger.warning("no accounts: %s does not exist (edge-agent board add-user)", path)
        return {}
    except OSError as exc:
        raise ConfigError("board.users_file", f"cannot read {path}: {exc.strerror}") from exc
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, digest = line.partition(":")
        if not sep or not valid_user_name(name) or not digest.startswith("$argon2"):
            logger.warning("%s line %d is not 'name:argon2 hash'; skipped", path, number)
            continue
        users[name] = digest
    return users


def add_user(path: Path, name: str, password: str) -> bool:
    """Add (or replace) an account; True when it replaced one. The file is rewritten
    atomically; a new file gets mode 0600 (it holds password hashes)."""
    if not valid_user_name(name):
        raise ConfigError("NAME", "1-64 characters of letters, digits and _ . @ -")
    if not password:
        raise ConfigError("password", "empty (give it on standard input)")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ConfigError("password", f"longer than {MAX_PASSWORD_CHARS} characters")
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.partition(":")[0] != name]
    kept.append(f"{name}:{_hasher.hash(password)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(kept) + "\n")
        os.chmod(tmp, 0o600)
        if path.exists():
            # Keep the owner, group and mode an administrator gave it (e.g. root:edge-board
            # 0640, so that the board's service user can read it).
            old = path.stat()
            with contextlib.suppress(PermissionError):
                os.chown(tmp, old.st_uid, old.st_gid)
            os.chmod(tmp, stat.S_IMODE(old.st_mode))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(kept) == len(lines)


def check_password(users_file: Path, name: str, password: str) -> bool:
    """True when ``name`` exists and ``password`` is its password. An unknown name costs
    the same hash as a known one (no user enumeration by timing)."""
    digest = read_users(users_file).get(name) if valid_user_name(name) else None
    try:
        ok = _hasher.verify(digest or _DUMMY_HASH, password[:MAX_PASSWORD_CHARS])
    except (VerificationError, InvalidHashError):
        return False
    return ok and digest is not None


@dataclass(frozen=True)
class Session:
    user: str
    csrf: str
    expires: float


class Sessions:
    """Session tokens (the cookie) → user and CSRF token, in memory."""

    def __init__(self, lifetime_seconds: float) -> None:
        self._lifetime = lifetime_seconds
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), time.monotonic() + self._lifetime)
        with self._lock:
            now = time.monotonic()
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            self._sessions[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._sessions.get(token)
            if session is not None and session.expires <= time.monotonic():
                del self._sessions[token]
                return None
        return session

    def end(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)


def same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class LoginLimiter:
    """At most ``per_minute`` failed logins in 60 s for one key (an address, a user name)."""

    WINDOW_SECONDS = 60.0

    def __init__(self, per_minute: int) -> None:
        self._limit = per_minute
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        while failures and failures[0] <= now - self.WINDOW_SECONDS:
            failures.popleft()
        return failures

    def blocked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(k, now)) >= self._limit for k in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)
            if len(self._failures) > 10000:  # forget idle keys (bounded memory)
                self._failures = {k: v for k, v in self._failures.items() if v}
