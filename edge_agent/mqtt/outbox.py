"""What the publisher needs from the store (:class:`edge_agent.store.Store` has it)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from ..store import OutboxMessage


class Outbox(Protocol):
    """What the publisher needs from the store. Every method must be thread-safe."""

    def outbox_pending(self, limit: int, exclude: Collection[int]) -> list[OutboxMessage]:
        """Up to ``limit`` rows, oldest first, whose ids are not in ``exclude``, set-aside
        rows never.

        To keep a study's messages in order, the store offers only the oldest row of each
        study topic that is not set aside; rows in ``exclude`` (in flight, being deleted,
        held after a refusal, on probation) still count as that oldest row, so the next
        revision waits for their PUBACK."""
        ...

    def outbox_delete(self, message_id: int) -> None:
        """Remove a delivered row. Called on paho's network thread."""
        ...

    def outbox_depth(self) -> int:
        """Rows not yet delivered (set-aside rows included)."""
        ...

    def outbox_set_aside(self, message_id: int, reason: str) -> bool:
        """Mark the row as set aside (it stays in the outbox); True when it was not set
        aside before (a retry that failed again returns False)."""
        ...

    def outbox_set_aside_messages(self) -> list[OutboxMessage]:
        """The rows set aside, oldest first (to try them again)."""
        ...
