"""The publisher: drains the outbox to the broker, keeps the retained status, hears acks
(the package docstring says how). Its parts: :class:`.connection.Connection` (the paho
client and its connection), :class:`.delivery.Delivery` (what becomes of each row) and the
bookkeeping they share, :class:`.flight.Flight` and :class:`.strikes.Strikes`."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes

from ..config import Settings
from ..store import AckOutcome
from ..text import printable
from .acks import Ack, AckLog, AckRefused, parse_ack
from .client import NotConnectedFilter, json_properties, utc_now
from .connection import Connection
from .delivery import Delivery
from .flight import STATUS_OWNER, Flight
from .outbox import Outbox
from .strikes import Strikes

logger = logging.getLogger(__name__)

_DRAIN_WAIT_SECONDS = 1.0


class Publisher:
    """Drains the outbox to the broker; keeps the retained status; receives acks.

    ``status`` returns the counters put into every status message; ``on_ack(ack)`` is called
    (on paho's network thread) for each well-formed ack from a dashboard and returns what
    became of it (the store's outcome), which the publisher logs and counts.
    """

    def __init__(
        self,
        settings: Settings,
        outbox: Outbox,
        *,
        status: Callable[[], dict[str, Any]],
        on_ack: Callable[[Ack], AckOutcome | None] | None = None,
        resend_after_seconds: float = 30.0,
    ) -> None:
        cfg = settings.mqtt
        self._outbox = outbox
        self._status = status
        self._on_ack = on_ack
        self._resend_after = resend_after_seconds
        self._base = base = settings.topic_base
        self._status_topic = f"{base}/status"
        self._ack_prefix = f"{base}/ack/"
        self._status_every = cfg.status_interval_seconds
        self._retry_set_aside_every = cfg.set_aside_retry_seconds
        self._stalled_after = cfg.stalled_after_seconds
        self._not_connected_filter = NotConnectedFilter()
        self.strikes = Strikes(cfg.max_attempts)
        self.acks = AckLog()
        self.last_error: str | None = None
        """The latest delivery problem (connection lost or refused, publish refused), with
        its UTC time; for the status message (written by the drain and network threads,
        one reference replaced whole)."""

        self._wake = threading.Event()
        self._next_status_at = 0.0
        self._next_set_aside_retry = 0.0  # at start
        self._drain_thread: threading.Thread | None = None
        self._started = False
        self._loop_death_logged = False
        flight = self._flight = Flight()  # rows and mids in flight (drain and network threads)
        self._link = Connection(
            settings,
            flight,
            status_topic=self._status_topic,
            ack_filter=f"{base}/ack/+",
            error=self._error,
            connected=self._on_connected,
            lost=lambda reason_code: self._delivery.connection_lost(reason_code),
            wake=self._wake.set,
            puback=lambda mid, reason_code: self._delivery.puback(mid, reason_code),
            ack=self._ack,
        )
        self._delivery = Delivery(
            outbox,
            flight,
            self.strikes,
            self._link,
            base=base,
            resend_after=resend_after_seconds,
            retry_set_aside_every=self._retry_set_aside_every,
            error=self._error,
            wake=self._wake.set,
        )

    @property
    def _client(self) -> mqtt.Client:
        """The paho client in use (tests look at its replacement)."""
        return self._link.client

    # -- public API ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and start draining; never blocks on the broker."""
        if self._started:
            raise RuntimeError("Publisher.start() called twice")
        self._started = True
        self._link.paho_log.addFilter(self._not_connected_filter)
        self._link.start()
        self._drain_thread = threading.Thread(
            target=self._drain_loop, name="mqtt-outbox-drain", daemon=True
        )
        self._drain_thread.start()
        logger.info(
            "MQTT publisher started for %s:%d, topics %s/…",
            self._link.host,
            self._link.port,
            self._base,
        )

    def wake(self) -> None:
        """New rows were committed to the outbox: drain now."""
        self._wake.set()

    @property
    def connected(self) -> bool:
        """Connected to the broker, and paho's network thread is alive to use it."""
        return self._link.connected.is_set() and self._link.network_alive()

    def wait_connected(self, timeout: float) -> bool:
        return self._link.connected.wait(timeout)

    def wait_acks_subscribed(self, timeout: float) -> bool:
        """True once the broker has granted the subscription to dashboards' acks (acks
        published before that are not delivered to this session)."""
        return self._link.acks_subscribed.wait(timeout)

    @property
    def in_flight(self) -> int:
        """Outbox rows handed to the broker and not yet acknowledged."""
        return len(self._flight)

    def healthy(self) -> bool:
        """paho's network thread and the drain thread are alive (paho's can die silently)."""
        return (
            self._started
            and not self._link.stopped
            and self._link.network_alive()
            and self._drain_thread is not None
            and self._drain_thread.is_alive()
        )

    def stalled(self) -> str | None:
        """Why delivery is stuck, or None: rows wait, the broker accepted a connection
        within ``mqtt.stalled_after_seconds``, and not one row has left the outbox (been
        acknowledged or set aside) in that time. A plain outage is not a stall."""
        now = time.monotonic()
        connack = self._link.connack_at
        if now - self._delivery.progress_at < self._stalled_after or connack is None:
            return None
        if not self._link.connected.is_set() and now - connack > self._stalled_after:
            return None
        return (
            f"the outbox has not moved for over {self._stalled_after:g} s although the "
            f"MQTT broker {self._link.host}:{self._link.port} accepts the connection"
        )

    def counters(self) -> dict[str, int]:
        """For the status message: rows being tried one at a time (the ack counters are
        kept in the store, see ``acks.take()``)."""
        return {"outbox_on_probation": self.strikes.suspects()}

    def publish_status(self) -> None:
        """Publish the retained ``online`` status now (skipped while disconnected: the next
        connect publishes a fresh one)."""
        if self.connected:
            self._publish_state("online")

    def stop(self, state: str = "stopped", timeout: float = 5.0) -> None:
        """Stop draining, let in-flight rows be acknowledged, publish the retained ``state``,
        disconnect cleanly (so the broker does not send the Will). Returns within about
        ``timeout`` + 1 s, also when the broker is down; rows not acknowledged stay in the
        outbox for the next run."""
        if self._link.stopped or not self._started:
            self._link.stopped = True
            return
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self._link.stopping.set()
        self._wake.set()
        if self._drain_thread is not None:
            self._drain_thread.join(left())

        if self.connected:
            flush_until = deadline - min(1.0, timeout / 4)
            self._flight.wait_settled(
                max(0.0, flush_until - time.monotonic()), lambda: self.connected
            )
        unacked = self.in_flight
        if unacked:
            logger.warning(
                "%d outbox messages not acknowledged at stop; they stay in the outbox", unacked
            )

        if self.connected:
            info = self._publish_state(state)
            if info is not None:
                try:
                    info.wait_for_publish(timeout=left())
                    if not info.is_published():
                        logger.warning("the broker did not acknowledge the %r status", state)
                except (RuntimeError, ValueError) as exc:  # connection lost meanwhile
                    logger.warning("could not publish the %r status: %s", state, exc)

        self._link.stop(left() + 1.0)
        self._link.paho_log.removeFilter(self._not_connected_filter)
        self.acks.flush()
        logger.info("MQTT publisher stopped (%s)", state)

    # -- publishing ----------------------------------------------------------------------

    def _status_payload(self, state: str) -> bytes:
        payload: dict[str, Any] = {"state": state}
        try:
            payload.update(self._status())
        except Exception:
            logger.exception("the status callback failed; publishing the state alone")
        payload["state"] = state
        payload["at"] = utc_now()
        return json.dumps(payload, separators=(",", ":"), default=str).encode()

    def _publish_state(self, state: str) -> mqtt.MQTTMessageInfo | None:
        self._next_status_at = time.monotonic() + self._status_every
        client = self._link.client
        info = client.publish(
            self._status_topic,
            self._status_payload(state),
            qos=1,
            retain=True,
            properties=json_properties(PacketTypes.PUBLISH),
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            logger.warning("could not queue the %r status: %s", state, mqtt.error_string(info.rc))
            return None
        self._delivery.track(client, info.mid, STATUS_OWNER)
        return info

    # -- drain thread --------------------------------------------------------------------

    def _drain_loop(self) -> None:
        failing = False
        while not self._link.stopping.is_set():
            self._wake.wait(_DRAIN_WAIT_SECONDS if failing else self._until_next_due())
            self._wake.clear()
            if self._link.stopping.is_set():
                break
            self._check_network_thread()
            self.acks.flush()
            try:
                self._link.replace_if_due()
                self._drain_once()
            except Exception:
                # The store or paho failed; keep going, but do not flood the log every second.
                if not failing:
                    logger.exception(
                        "outbox drain failed; retrying every %.0f s", _DRAIN_WAIT_SECONDS
                    )
                failing = True
            else:
                if failing:
                    logger.info("outbox drain recovered")
                failing = False

    def _until_next_due(self) -> float:
        """Seconds until a held row, an overdue PUBACK or the status refresh is due (≤ 1 s)."""
        if not self.connected:  # nothing is due; on_connect wakes the thread
            return _DRAIN_WAIT_SECONDS
        due = self._flight.next_due(self._resend_after)
        at = self._next_status_at if due is None else min(due, self._next_status_at)
        wait = at - time.monotonic()
        return min(max(wait, 0.01), _DRAIN_WAIT_SECONDS)

    def _check_network_thread(self) -> None:
        if not self._link.network_alive() and not self._loop_death_logged:
            self._loop_death_logged = True
            self._error("paho's network thread has died")
            logger.error("paho's network thread has died: nothing is delivered until a restart")

    def _drain_once(self) -> None:
        now = time.monotonic()
        if not self.connected:
            self._note_idle()
            return
        if now >= self._next_status_at:
            self._publish_state("online")
        self._flight.purge(now)
        self._delivery.resend_overdue(now)
        if now >= self._next_set_aside_retry and not self.strikes.suspects():
            self._next_set_aside_retry = now + self._retry_set_aside_every
            retried = self.strikes.retry(self._outbox.outbox_set_aside_messages())
            if retried:
                logger.info("trying %d set-aside outbox messages again, one at a time", retried)
        suspect = self.strikes.next_suspect()
        if suspect is not None:
            # Probation: the suspect goes alone, so that a broken connection names it.
            if not self._flight.busy():
                self._delivery.send(suspect)
            return
        while self.connected and not self._link.stopping.is_set():
            room, exclude = self._flight.room(self._link.row_cap)
            if room <= 0:
                return
            rows = self._outbox.outbox_pending(room, exclude)
            for row in rows:
                self._delivery.send(row)
            if not rows and not exclude:
                self._delivery.nothing_waits()
            if len(rows) < room:
                return

    def _note_idle(self) -> None:
        """While disconnected: an outbox with nothing to deliver is not stuck either."""
        busy = self._flight.busy(held=True)
        if not busy and not self.strikes.suspects() and not self._outbox.outbox_pending(1, ()):
            self._delivery.nothing_waits()

    # -- network thread ------------------------------------------------------------------

    def _on_connected(self) -> None:
        """An accepted CONNACK: a fresh retained status, and the outbox drains."""
        self._publish_state("online")
        self._wake.set()

    def _ack(self, message: mqtt.MQTTMessage) -> None:
        """An ack is data: checked (acks.py), logged with its text escaped, one line per
        real ack; bad and unknown ones are counted and logged rate-limited."""
        uid = "?"
        try:
            uid = message.topic[len(self._ack_prefix) :]
            try:
                ack = parse_ack(uid, message.payload)
            except AckRefused as exc:
                self.acks.refused(uid, str(exc))
                return
            outcome = self._on_ack(ack) if self._on_ack is not None else None
            if outcome == "not an urgent alert":
                self.acks.unknown(ack)
                return
            self.acks.received()
            logger.info(
                "ack for study %s alert %s: %s",
                ack.study_instance_uid,
                ack.alert_id,
                outcome or "received",
            )
        except Exception:
            logger.exception("error while handling the ack for study %s", printable(uid, 80))

    def _error(self, what: str) -> None:
        self.last_error = f"{utc_now()} {what}"
