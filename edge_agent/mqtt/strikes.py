"""Which outbox row broke delivery: failed attempts per row, and rows on probation.

A row's attempt fails when the broker refuses it (PUBACK reason code >= 0x80), or when the
connection breaks while that row is the only outbox row in flight. When it breaks with
several rows in flight, nobody can tell which one (if any: a broker restart looks the same)
broke it, so none gets a strike: all of them become *suspects* and are sent again one at a
time (on probation) before anything else, so that the next break names its row. A plain
broker outage therefore costs one round of single sends, never a set-aside; a row that
breaks the connection whenever it is sent collects a strike each time it is alone in flight.

After ``max_attempts`` failed attempts the publisher sets the row aside (kept in the
outbox, retried later) and the rest of the outbox flows.

Pure bookkeeping, without paho or a broker; every method takes the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from ..store import OutboxMessage


class Strikes:
    def __init__(self, max_attempts: int) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self._lock = threading.Lock()
        self._strikes: dict[int, int] = {}  # outbox id -> failed attempts so far
        self._suspects: dict[int, OutboxMessage] = {}

    def failed(self, message_id: int) -> int:
        """One more failed attempt of ``message_id``; returns how many it has had. The row
        leaves probation: the caller holds it back or sets it aside."""
        with self._lock:
            count = self._strikes.get(message_id, 0) + 1
            self._strikes[message_id] = count
            self._suspects.pop(message_id, None)
            return count

    def exhausted(self, count: int) -> bool:
        return count >= self.max_attempts

    def connection_lost(self, in_flight: Sequence[OutboxMessage]) -> OutboxMessage | None:
        """The connection broke with ``in_flight`` unacknowledged. With one row in flight,
        that row gets a strike and stays on probation; returned when it has had
        ``max_attempts``. With several, all become suspects (no strike); returns None."""
        with self._lock:
            if len(in_flight) == 1:
                (row,) = in_flight
                count = self._strikes.get(row.id, 0) + 1
                self._strikes[row.id] = count
                if count >= self.max_attempts:
                    self._suspects.pop(row.id, None)
                    return row
                self._suspects[row.id] = row
                return None
            for row in in_flight:
                self._suspects.setdefault(row.id, row)
            return None

    def retry(self, rows: Iterable[OutboxMessage]) -> int:
        """Put rows that were set aside on probation with one attempt left; returns how
        many (rows already on probation are left as they are)."""
        added = 0
        with self._lock:
            for row in rows:
                if row.id not in self._suspects:
                    self._suspects[row.id] = row
                    self._strikes[row.id] = self.max_attempts - 1
                    added += 1
        return added

    def next_suspect(self) -> OutboxMessage | None:
        """The oldest row on probation (it goes alone), or None."""
        with self._lock:
            return self._suspects[min(self._suspects)] if self._suspects else None

    def is_suspect(self, message_id: int) -> bool:
        with self._lock:
            return message_id in self._suspects

    def suspects(self) -> int:
        with self._lock:
            return len(self._suspects)

    def count(self, message_id: int) -> int:
        with self._lock:
            return self._strikes.get(message_id, 0)

    def forget(self, message_id: int) -> None:
        """The row was delivered or set aside."""
        with self._lock:
            self._strikes.pop(message_id, None)
            self._suspects.pop(message_id, None)
