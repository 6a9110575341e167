"""What becomes of each outbox row: handed to paho, acknowledged and deleted, refused and
held back, set aside, or struck when the connection breaks (see the package docstring).

Runs on the drain thread (sending, resending) and on paho's network thread (PUBACKs, a
broken connection); the state both touch is in :class:`.flight.Flight` and
:class:`.strikes.Strikes`, each behind its own lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from ..store import OutboxMessage
from .client import describe, json_properties, topic_problem
from .connection import Connection
from .flight import STATUS_OWNER, Flight
from .outbox import Outbox
from .strikes import Strikes

logger = logging.getLogger(__name__)

RETRY_MAX_SECONDS = 600.0
"""Longest wait before a row the broker refused (PUBACK reason >= 0x80) is tried again."""


class Delivery:
    """Sends rows and settles their PUBACKs.

    Handed: the ``outbox`` (rows deleted or set aside), ``flight`` and ``strikes`` (the
    bookkeeping), ``link`` (the client in use, and whether it is about to be replaced),
    ``error`` (notes a delivery problem) and ``wake`` (the drain thread looks again).
    ``progress_at`` is when a row last left the outbox, or nothing waited (read by the
    stall check)."""

    def __init__(
        self,
        outbox: Outbox,
        flight: Flight,
        strikes: Strikes,
        link: Connection,
        *,
        base: str,
        resend_after: float,
        retry_set_aside_every: float,
        error: Callable[[str], None],
        wake: Callable[[], None],
    ) -> None:
        self._outbox = outbox
        self._flight = flight
        self.strikes = strikes
        self._link = link
        self._base = base
        self._resend_after = resend_after
        self._retry_set_aside_every = retry_set_aside_every
        self._error = error
        self._wake = wake
        self._publish_props = json_properties(PacketTypes.PUBLISH)
        self._status_refused_logged = False
        self.progress_at = time.monotonic()  # a row left the outbox, or none was waiting

    def nothing_waits(self) -> None:
        """The outbox has nothing to deliver: nothing is stuck either (the stall check)."""
        self.progress_at = time.monotonic()

    def send(self, message: OutboxMessage, *, resend: bool = False) -> None:
        """Hand one outbox row to paho and remember its mid.

        The row is entered as in flight *before* publish(): the broker may drop the
        connection on this very PUBLISH before publish() has returned, and the disconnect
        handler must then know the row was on its way."""
        problem = topic_problem(message.topic)
        if problem is not None:
            self.set_aside(message, problem)
            return
        client = self._link.client
        if self._link.replace_at is not None:
            return  # the connection broke: offered again once the client is replaced
        entered = self._flight.enter(message, resend=resend)
        if entered is None:
            return  # acknowledged meanwhile
        entry, created = entered
        try:
            info = client.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=False,
                properties=self._publish_props,
            )
        except ValueError as exc:  # payload too large (or a topic paho refuses): never goes
            self._flight.unsent(entry, created)
            self.set_aside(message, f"paho cannot publish it: {exc}")
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # Not queued by paho (e.g. its queue is full): the row stays, tried next round.
            self._flight.unsent(entry, created)
            logger.warning(
                "paho did not take %s: %s",
                describe(self._base, message),
                mqtt.error_string(info.rc),
            )
            return
        # MQTT_ERR_NO_CONN: paho keeps the message and sends it after reconnecting.
        if self._flight.sent(client, entry, info.mid, broken=self._link.replace_at is not None):
            self.track(client, info.mid, message.id)

    def track(self, client: mqtt.Client, mid: int, owner: int) -> None:
        """Record who owns ``mid``; settle it now if its PUBACK already arrived."""
        early = self._flight.track(client, mid, owner)
        if early is not None:
            self.puback(mid, early)

    def set_aside(self, message: OutboxMessage, reason: str) -> None:
        """Keep the row in the outbox, out of the way; the rest flows."""
        self.strikes.forget(message.id)
        self._flight.release(message.id)
        self._error(f"set aside {describe(self._base, message)}: {reason}")
        try:
            first = self._outbox.outbox_set_aside(message.id, reason)
        except Exception:
            # Not marked: it comes back with the next batch and is set aside again then.
            logger.exception("could not set aside %s", describe(self._base, message))
            return
        self.progress_at = time.monotonic()
        if first:
            logger.error(
                "set aside %s: %s; it stays in the outbox and is tried again every %g s "
                "and at start; the other messages go on",
                describe(self._base, message),
                reason,
                self._retry_set_aside_every,
            )
        else:
            logger.warning("%s set aside again: %s", describe(self._base, message), reason)

    def resend_overdue(self, now: float) -> None:
        for message, age in self._flight.overdue(now, self._resend_after):
            logger.warning(
                "no PUBACK for %s after %.0f s; publishing it again",
                describe(self._base, message),
                age,
            )
            self.send(message, resend=True)

    def connection_lost(self, reason_code: ReasonCode) -> bool:
        """The connection broke after CONNACK. Outbox rows in flight: a strike for a row that
        was alone, suspects otherwise; True when there were any (paho's copies are to be
        dropped with the client)."""
        rows = self._flight.connection_lost()
        if not rows:
            return False  # paho resends the status message itself; nothing to attribute
        culprit = self.strikes.connection_lost(rows)
        if len(rows) == 1 and culprit is None:
            logger.info(
                "%s was alone in flight when the connection broke (attempt %d of %d)",
                describe(self._base, rows[0]),
                self.strikes.count(rows[0].id),
                self.strikes.max_attempts,
            )
        elif len(rows) > 1:
            logger.info(
                "%d outbox messages were in flight when the connection broke; they are sent "
                "again one at a time",
                len(rows),
            )
        if culprit is not None:
            self.set_aside(
                culprit,
                f"the broker closed the connection each of the {self.strikes.max_attempts} "
                f"times it was sent alone ({reason_code})",
            )
        return True

    def puback(self, mid: int, reason_code: ReasonCode) -> None:
        """A PUBACK (paho's network thread), or one that came before its mid was known."""
        settled = self._flight.puback(mid, reason_code)
        if settled is None:
            return
        owner, entry = settled
        if owner == STATUS_OWNER:
            self._settle_status(reason_code)
        elif entry is not None:
            if reason_code.is_failure:
                self._refused(entry.message, reason_code)
            else:
                self._delivered(entry.message)
        self._wake()

    def _delivered(self, message: OutboxMessage) -> None:
        try:
            self._outbox.outbox_delete(message.id)
        except Exception:
            logger.exception(
                "could not delete delivered %s from the outbox; it will be sent again",
                describe(self._base, message),
            )
        else:
            self.progress_at = time.monotonic()
            logger.debug("delivered %s", describe(self._base, message))
        finally:
            self.strikes.forget(message.id)
            self._flight.deleted(message.id)

    def _refused(self, message: OutboxMessage, reason_code: ReasonCode) -> None:
        count = self.strikes.failed(message.id)
        self._error(f"broker refused a publish: {reason_code}")
        if self.strikes.exhausted(count):
            self.set_aside(
                message,
                f"the broker refused it {count} times: {reason_code} (0x{reason_code.value:02x})",
            )
            return
        delay = min(self._resend_after * 2 ** (count - 1), RETRY_MAX_SECONDS)
        self._flight.hold(message.id, time.monotonic() + delay)
        if count == 1:
            logger.error(
                "the broker refused %s: %s (0x%02x); kept in the outbox, retrying with "
                "back-off, set aside after %d attempts",
                describe(self._base, message),
                reason_code,
                reason_code.value,
                self.strikes.max_attempts,
            )
        else:
            logger.debug(
                "the broker refused %s again (%d times): %s",
                describe(self._base, message),
                count,
                reason_code,
            )

    def _settle_status(self, reason_code: ReasonCode) -> None:
        if not reason_code.is_failure:
            self._status_refused_logged = False
        elif not self._status_refused_logged:
            self._status_refused_logged = True
            logger.error("the broker refused the status message: %s", reason_code)
