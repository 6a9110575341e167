"""Opening the state database: the state folder, the file's integrity, what a failure means.

:func:`connect` is how every writing connection is made (WAL, ``synchronous=FULL``: a
committed step survives a power cut); :func:`inspect_database` reads a database without
changing anything (``edge-agent check``, and :class:`~edge_agent.store.Store` before it
writes); :func:`set_aside` moves a damaged one out of the way, never deleting it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from ..errors import ConfigError, CorruptState, EdgeTriageError, ResourceMissing
from .schema import schema_problem


def connect(path: Path) -> sqlite3.Connection:
    """A writing connection to ``path``: autocommit (transactions are explicit), WAL, fsync
    on every commit, foreign keys on."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


_ERROR_NAMES = {
    "database disk image is malformed": "SQLITE_CORRUPT",
    "file is not a database": "SQLITE_NOTADB",
    "attempt to write a readonly database": "SQLITE_READONLY",
    "unable to open database file": "SQLITE_CANTOPEN",
    "database or disk is full": "SQLITE_FULL",
    "database is locked": "SQLITE_BUSY",
    "disk I/O error": "SQLITE_IOERR",
}


def _error_name(exc: sqlite3.Error) -> str:
    """SQLite's primary result code name (``SQLITE_CORRUPT``); Python < 3.11 from the text."""
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str):
        return "_".join(name.split("_")[:2])  # SQLITE_IOERR_WRITE -> SQLITE_IOERR
    return next((v for k, v in _ERROR_NAMES.items() if str(exc).startswith(k)), "")


def state_error(exc: sqlite3.Error, path: Path) -> EdgeTriageError | None:
    """What a failure to open or write the state database at ``path`` means for an operator;
    None for a failure that is not about the database file, its folder or its disk."""
    name = _error_name(exc)
    if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return CorruptState(path, str(exc))
    if name in ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM"):
        return ConfigError(
            "state_dir",
            f"cannot write the state database {path} ({exc}): give the folder and its "
            "state.sqlite3* files to the agent's user, or set state_dir to a folder it can write",
        )
    if name == "SQLITE_FULL":
        return ResourceMissing(f"state_dir: the disk holding {path} is full: free some space")
    if name in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return ResourceMissing(
            f"state_dir: the state database {path} is locked by another process (another "
            "edge-agent with the same state_dir?): stop it, or give each agent its own state_dir"
        )
    if name == "SQLITE_IOERR":
        return ResourceMissing(f"state_dir: {path}: disk I/O error: check the disk (dmesg)")
    return None


def state_dir_problem(folder: Path) -> ConfigError | None:
    """Why ``folder`` cannot hold the agent's state (None: it can). Changes nothing."""
    if folder.exists() and not folder.is_dir():
        return ConfigError(
            "state_dir", f"{folder} is a file, not a folder: set state_dir to a folder"
        )
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return ConfigError(
            "state_dir", f"{existing} is a file, so {folder} cannot be created: fix state_dir"
        )
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return ConfigError(
            "state_dir",
            f"{folder} is on a read-only filesystem: set state_dir to a folder on a writable "
            "disk (under systemd: inside StateDirectory= or a ReadWritePaths= folder)",
        )
    names = [folder / f"state.sqlite3{end}" for end in ("", "-wal", "-shm")]
    for path in [existing, *(p for p in names if p.exists())]:
        if not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            return ConfigError(
                "state_dir",
                f"{path} is not writable by this user: give it to the agent's user (e.g. "
                "chown -R edge-agent: on the folder) or set state_dir to a folder it can write",
            )
    return None


def inspect_database(path: Path) -> str | None:
    """Read ``path`` without changing anything: ``PRAGMA quick_check`` and the schema version.

    Returns the schema version found (None: a new or empty database); raises CorruptState
    when the file is damaged, ConfigError when this agent cannot use its schema, and the
    ConfigError/ResourceMissing of :func:`state_error` when it cannot be read.
    """
    if not path.exists():
        return None
    # Without a -wal file the database is complete in its main file: immutable=1 reads it
    # without creating -wal/-shm files (which, made by root running `check`, the agent's
    # user could not write). With one, a plain read-only connection reads it and the WAL.
    wal = path.with_name(path.name + "-wal").exists()
    uri = f"{path.absolute().as_uri()}?{'mode=ro' if wal else 'immutable=1'}"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0)
        try:
            rows = conn.execute("PRAGMA quick_check(5)").fetchall()
            if rows != [("ok",)]:
                raise CorruptState(path, "; ".join(str(r[0]) for r in rows)[:300])
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            row = (
                conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if "meta" in tables
                else None
            )
        finally:
            conn.close()
    except sqlite3.Error as exc:
        err = state_error(exc, path)
        if err is None:
            raise
        raise err from exc
    if row is None:
        return None
    problem = schema_problem(path, row[0])
    if problem is not None:
        raise problem
    return str(row[0])


def set_aside(path: Path, now: float | None = None) -> Path:
    """Rename a damaged ``path`` and its -wal/-shm to ``<name>.corrupt-<UTC time>`` (never
    deleted, never written to); returns the new name of the database file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for end in ("-wal", "-shm", ""):  # the main file last: a crash between leaves it found
        old = path.with_name(path.name + end)
        if old.exists():
            os.rename(old, target.with_name(target.name + end))
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the renames survive a power cut
    finally:
        os.close(fd)
    return target
