"""A state database made into what an older agent wrote: what each later schema version added
is taken away again, newest first. The tests' one copy of the schema's history (the
migrations in ``edge_agent/state/schema.py`` are the other direction of it), so a new version
is undone here once instead of in every test that starts from an older database."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from edge_agent.state.schema import SCHEMA_VERSION

UNDO: dict[int, str] = {
    # version n's database: what the migration n -> n + 1 added, removed
    6: "ALTER TABLE results DROP COLUMN pacs_stored_at;",
    5: (
        "DROP TABLE tally_levels; DROP TABLE tally_findings; DROP TABLE tally_bins;"
        "DELETE FROM meta WHERE key = 'tally_model';"
        "ALTER TABLE results DROP COLUMN published_at;"
        "ALTER TABLE alerts DROP COLUMN ack_taken_at;"
    ),
    4: "DROP TABLE pacs_outbox;",
    3: (
        "ALTER TABLE outbox DROP COLUMN set_aside_at;"
        "ALTER TABLE outbox DROP COLUMN set_aside_reason;"
    ),
    2: "DROP TABLE narratives; ALTER TABLE alerts DROP COLUMN carried_from;",
    1: "ALTER TABLE outbox DROP COLUMN triage; DROP TABLE alerts;",
}


def as_schema(path: Path, version: int) -> Path:
    """Make the database at ``path`` (written by this agent) one of schema ``version``;
    returns ``path``."""
    assert set(UNDO) == set(range(1, SCHEMA_VERSION)), "a new schema version is not undone here"
    with contextlib.closing(sqlite3.connect(path)) as db:
        for undone in range(SCHEMA_VERSION - 1, version - 1, -1):
            db.executescript(UNDO[undone])
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
        db.commit()
    return path
