"""The database's own keys and the agent's counters (``meta``, ``counters``)."""

from __future__ import annotations

import secrets
import sqlite3


def count(conn: sqlite3.Connection, name: str, by: int = 1) -> None:
    """Add ``by`` to the counter ``name`` (in the caller's transaction)."""
    conn.execute(
        "INSERT INTO counters (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        (name, by),
    )


def secret(conn: sqlite3.Connection, name: str) -> bytes:
    """The random 32-byte secret kept in ``meta`` under ``name``, created on first use."""
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (name, secrets.token_hex(32))
    )
    (value,) = conn.execute("SELECT value FROM meta WHERE key = ?", (name,)).fetchone()
    return bytes.fromhex(value)


def note_delivery(conn: sqlite3.Connection, last_error: str | None, counts: dict[str, int]) -> None:
    """The publisher's latest delivery problem (``meta.mqtt_last_error``) and counts to add."""
    if last_error is not None:
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('mqtt_last_error', ?)",
            (last_error,),
        )
    for name, by in counts.items():
        if by:
            count(conn, name, by)
