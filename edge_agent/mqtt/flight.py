"""What is in flight: the outbox rows handed to paho and the packet ids (mids) of their
copies, under one lock.

The drain thread hands rows to paho and paho's network thread reports their PUBACKs; both
update this bookkeeping, and ``Publisher.stop()`` waits on it (:meth:`Flight.wait_settled`).
Its parts:

* rows in flight: outbox id → :class:`InFlight` (the row, when it was last published, the
  mids of its copies); a row is entered *before* ``publish()`` so that a connection broken
  by that very PUBLISH finds it;
* mids: paho mid → owner (an outbox id, or :data:`STATUS_OWNER` for a status message);
* unclaimed: PUBACKs that arrived before ``publish()`` had returned the mid (claimed by
  :meth:`Flight.track`, forgotten after :data:`UNCLAIMED_TTL_SECONDS`);
* stale: mids of other copies of a row already settled (their PUBACKs are ignored);
* deleting: acknowledged rows whose ``outbox_delete`` is running;
* held: rows the broker refused, with the time they may go again.

The rows on probation (suspects) and the failed attempts per row are in ``strikes.py``.
A session is the paho client in use: :meth:`Flight.new_session` forgets every mid of the one
before (its copies die with it). Pure bookkeeping, without paho's client or a broker; every
method takes the lock, none calls out while holding it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from paho.mqtt.reasoncodes import ReasonCode

from ..store import OutboxMessage

STATUS_OWNER = -1
"""Owner of the mids of status messages (outbox ids are positive)."""
UNCLAIMED_TTL_SECONDS = 60.0


@dataclass
class InFlight:
    message: OutboxMessage
    sent_at: float  # time.monotonic() of the latest publish
    mids: set[int] = field(default_factory=set)


class Flight:
    """The in-flight bookkeeping (see the module docstring); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified when rows leave flight
        self._session: object = None
        self._in_flight: dict[int, InFlight] = {}
        self._mids: dict[int, int] = {}
        self._unclaimed: dict[int, tuple[ReasonCode, float]] = {}
        self._stale: set[int] = set()
        self._deleting: set[int] = set()
        self._held: dict[int, float] = {}

    # -- sessions -------------------------------------------------------------------------

    def new_session(self, session: object) -> None:
        """``session`` (a paho client) is the one in use now: the mids of the one before
        mean nothing any more."""
        with self._lock:
            self._session = session
            self._mids.clear()
            self._unclaimed.clear()
            self._stale.clear()

    # -- publishing -----------------------------------------------------------------------

    def enter(self, message: OutboxMessage, *, resend: bool) -> tuple[InFlight, bool] | None:
        """Enter ``message`` as in flight before it is published: (its entry, True when it
        was not in flight before). None for a resend of a row acknowledged meanwhile."""
        now = time.monotonic()
        with self._lock:
            entry = self._in_flight.get(message.id)
            if entry is None and resend:
                return None
            created = entry is None
            if entry is None:
                entry = self._in_flight[message.id] = InFlight(message, now)
            entry.sent_at = now
            return entry, created

    def unsent(self, entry: InFlight, created: bool) -> None:
        """publish() did not take the row: it is not in flight after all (unless it was
        before this attempt)."""
        if not created:
            return
        with self._settled:
            if self._in_flight.get(entry.message.id) is entry:
                del self._in_flight[entry.message.id]
            self._settled.notify_all()

    def sent(self, session: object, entry: InFlight, mid: int, *, broken: bool) -> bool:
        """publish() returned ``mid`` for ``entry``'s row on ``session``; True when the
        caller is to :meth:`track` it. ``broken``: the connection broke meanwhile (the
        client is to be replaced): the row leaves flight, offered again after that."""
        message_id = entry.message.id
        with self._settled:
            if session is not self._session or broken:
                # If the disconnect handler saw the row, it is a suspect now; if not, it is
                # offered again after the replacement.
                if self._in_flight.get(message_id) is entry:
                    del self._in_flight[message_id]
                    self._settled.notify_all()
                return False
            if self._in_flight.get(message_id) is not entry:
                # Another copy was acknowledged while this one was being published.
                if self._unclaimed.pop(mid, None) is None:
                    self._stale.add(mid)
                return False
            entry.mids.add(mid)
            return True

    def track(self, session: object, mid: int, owner: int) -> ReasonCode | None:
        """Record who owns ``mid``; the reason code of its PUBACK if that arrived already
        (the caller settles it now)."""
        with self._lock:
            if session is not self._session:
                return None
            self._mids[mid] = owner
            self._stale.discard(mid)
            early = self._unclaimed.pop(mid, None)
        return None if early is None else early[0]

    # -- PUBACKs --------------------------------------------------------------------------

    def puback(self, mid: int, reason_code: ReasonCode) -> tuple[int, InFlight | None] | None:
        """A PUBACK for ``mid``: (its owner, the row's entry if it was still in flight), or
        None when no owner is known (a stale copy's, or one to be claimed by :meth:`track`).
        An accepted row is marked as being deleted (:meth:`deleted` ends that)."""
        with self._lock:
            owner = self._mids.pop(mid, None)
            if owner is None:
                if mid in self._stale:  # another copy of this row was acknowledged first
                    self._stale.discard(mid)
                else:  # publish() has not returned to the sender yet; track() claims it
                    self._unclaimed[mid] = (reason_code, time.monotonic())
                return None
            if owner == STATUS_OWNER:
                return owner, None
            entry = self._in_flight.pop(owner, None)
            if entry is not None:
                for other in entry.mids - {mid}:
                    self._mids.pop(other, None)
                    self._stale.add(other)
                if not reason_code.is_failure:
                    self._deleting.add(owner)
            return owner, entry

    def deleted(self, message_id: int) -> None:
        """The acknowledged row's delete is over (done or failed)."""
        with self._settled:
            self._deleting.discard(message_id)
            self._settled.notify_all()

    def hold(self, message_id: int, until: float) -> None:
        """The broker refused the row: not offered again before ``until`` (monotonic)."""
        with self._settled:
            self._held[message_id] = until
            self._settled.notify_all()

    def release(self, message_id: int) -> None:
        """The row was set aside: held no more."""
        with self._settled:
            self._held.pop(message_id, None)
            self._settled.notify_all()

    # -- the connection -------------------------------------------------------------------

    def connection_lost(self) -> list[OutboxMessage]:
        """The connection broke: the rows that were in flight (oldest first), in flight no
        more."""
        with self._settled:
            rows = sorted((e.message for e in self._in_flight.values()), key=lambda m: m.id)
            if rows:
                self._in_flight.clear()
                self._settled.notify_all()
        return rows

    def restart_clocks(self) -> None:
        """Connected again: paho resends its unacknowledged messages itself."""
        now = time.monotonic()
        with self._lock:
            for entry in self._in_flight.values():
                entry.sent_at = now

    def wake_waiters(self) -> None:
        """:meth:`wait_settled` looks again (the connection is gone)."""
        with self._settled:
            self._settled.notify_all()

    def wait_settled(self, timeout: float, connected: Callable[[], bool]) -> None:
        """Until no row is in flight or being deleted, or ``connected()`` is False."""
        with self._settled:
            self._settled.wait_for(
                lambda: not (self._in_flight or self._deleting) or not connected(),
                timeout=timeout,
            )

    # -- the drain thread's questions -----------------------------------------------------

    def __len__(self) -> int:
        """Rows in flight."""
        with self._lock:
            return len(self._in_flight)

    def busy(self, *, held: bool = False) -> bool:
        """Rows in flight or being deleted (and, with ``held``, rows held back)."""
        with self._lock:
            return bool(self._in_flight or self._deleting or (held and self._held))

    def room(self, cap: int) -> tuple[int, set[int]]:
        """(how many more rows may go, with ``cap`` rows in flight at most; the ids the
        outbox must not offer: in flight, being deleted or held)."""
        with self._lock:
            exclude = set(self._in_flight) | self._deleting | set(self._held)
            return cap - len(self._in_flight), exclude

    def next_due(self, resend_after: float) -> float | None:
        """The earliest time (monotonic) a held row or an overdue PUBACK is due."""
        with self._lock:
            due = [*self._held.values()]
            due += [e.sent_at + resend_after for e in self._in_flight.values()]
        return min(due, default=None)

    def purge(self, now: float) -> None:
        """Held rows whose time has come may go; PUBACKs unclaimed too long are dropped."""
        with self._lock:
            for message_id in [i for i, at in self._held.items() if at <= now]:
                del self._held[message_id]
            for mid in [
                m for m, (_, at) in self._unclaimed.items() if now - at > UNCLAIMED_TTL_SECONDS
            ]:
                del self._unclaimed[mid]

    def overdue(self, now: float, resend_after: float) -> list[tuple[OutboxMessage, float]]:
        """Rows with no PUBACK ``resend_after`` seconds after they were last published,
        with how long ago that was."""
        with self._lock:
            return [
                (entry.message, now - entry.sent_at)
                for entry in self._in_flight.values()
                if now - entry.sent_at >= resend_after
            ]
