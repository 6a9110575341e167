"""The MQTT side of the agent: outbox delivery, retained status, Will, acks.

Results are written to the durable outbox (``store.py``) before anything is published; the
:class:`Publisher` drains it and deletes a row only when the broker's PUBACK says it was
accepted. Topics (``P = settings.topic_base``, see CONTRACT.md "MQTT")::

    P/study/{StudyInstanceUID}   agent →  QoS 1, not retained   rows from the outbox
    P/rejected                   agent →  QoS 1, not retained   rows from the outbox
    P/status                     agent →  QoS 1, retained       online | stopped; Will: offline
    P/ack/{StudyInstanceUID}     → agent  QoS 1                 {"alert_id", "by", "at"}

Threads: paho's network thread (``loop_start``) runs every callback, PUBACKs included, so
``Outbox.outbox_delete`` and ``on_ack`` are called on it. The drain thread (ours) fetches
pending rows in batches, keeps at most :data:`MAX_IN_FLIGHT` of them handed to paho,
republishes rows whose PUBACK is overdue and refreshes the retained status. Neither thread
holds our lock while calling into paho, so the lock order is never inverted.

Delivery is at least once: a row can be published again after a reconnect, an overdue
PUBACK or a failed delete, and receivers dedup on ``alert_id`` (and ``notify_count`` for
re-notifications). Order per study holds: the store offers a study topic's next row only
once the one before has been acknowledged and deleted, so every copy of revision n is
handed to paho (whose queue is FIFO) before revision n+1.

Broker outages: paho's network thread reconnects with back-off (``reconnect_delay_set``:
1 s doubling to :data:`RECONNECT_MAX_SECONDS`, reset on each CONNACK); rows queued
meanwhile wait in the outbox and drain after the reconnect. paho keeps unacknowledged
QoS 1 messages in memory and resends them itself after a reconnect; the outbox is what
survives a restart of the process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .config import Settings
from .errors import BrokerUnreachable, ConfigError
from .store import OutboxMessage

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
MAX_IN_FLIGHT = 20
"""paho's ``max_inflight``; outbox rows in flight are capped below it and below the broker's
MQTT v5 Receive Maximum (which paho ignores), leaving a slot for the status message."""
RECONNECT_MIN_SECONDS = 1
RECONNECT_MAX_SECONDS = 30
SESSION_EXPIRY_SECONDS = 24 * 3600
"""The broker keeps our session (the ack subscription and acks sent meanwhile) this long."""
RETRY_MAX_SECONDS = 600.0
"""Longest wait before a row the broker refused (PUBACK reason >= 0x80) is tried again."""

_DRAIN_WAIT_SECONDS = 1.0
_UNCLAIMED_TTL_SECONDS = 60.0
_STATUS_OWNER = -1  # owner of the mids of status messages (outbox ids are positive)


class Outbox(Protocol):
    """What the publisher needs from the store. Every method must be thread-safe."""

    def outbox_pending(self, limit: int, exclude: Collection[int]) -> list[OutboxMessage]:
        """Up to ``limit`` rows, oldest first, whose ids are not in ``exclude``.

        To keep a study's messages in order, the store offers only the oldest row of each
        study topic; rows in ``exclude`` (in flight, being deleted, held after a refusal)
        still count as that oldest row, so the next revision waits for their PUBACK."""
        ...

    def outbox_delete(self, message_id: int) -> None:
        """Remove a delivered row. Called on paho's network thread."""
        ...

    def outbox_depth(self) -> int:
        """Rows not yet delivered."""
        ...


def default_client_id(settings: Settings) -> str:
    return settings.mqtt.client_id or f"edge-agent-{settings.site}-{settings.device_id}"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _json_properties(packet_type: int) -> Properties:
    props = Properties(packet_type)
    props.ContentType = CONTENT_TYPE
    return props


def _new_client(settings: Settings, client_id: str) -> mqtt.Client:
    """A paho client with credentials and TLS set up; raises ConfigError naming the key."""
    cfg = settings.mqtt
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password())
    if cfg.tls_ca is not None:
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(cfg, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"mqtt.{key}", f"{path} is not a readable file")
        try:
            client.tls_set(
                ca_certs=str(cfg.tls_ca),
                certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
                keyfile=str(cfg.tls_key) if cfg.tls_key else None,
            )
        except OSError as exc:  # ssl.SSLError is an OSError
            key = "mqtt.tls_cert" if cfg.tls_cert else "mqtt.tls_ca"
            raise ConfigError(key, f"cannot load the TLS files: {exc}") from exc
    return client


@dataclass
class _InFlight:
    message: OutboxMessage
    sent_at: float  # time.monotonic() of the latest publish
    mids: set[int] = field(default_factory=set)


class _StopRaceFilter(logging.Filter):
    """Drops paho's "Client is not connected" error during our own stop.

    disconnect() closes the socket while paho's network thread may be between two loop
    iterations; paho then logs that error once before loop_stop() ends the thread. It says
    nothing about delivery (the outbox already holds what was not acknowledged), and an
    ERROR line on every clean shutdown would teach operators to ignore ERROR lines. The
    filter is on paho's logger only between disconnect() and the end of loop_stop().
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


class Publisher:
    """Drains the outbox to the broker; keeps the retained status; receives acks.

    ``status`` returns the counters put into every status message; ``on_ack(uid, ack)`` is
    called (on paho's network thread) for each well-formed ack from a dashboard.
    """

    def __init__(
        self,
        settings: Settings,
        outbox: Outbox,
        *,
        status: Callable[[], dict[str, Any]],
        on_ack: Callable[[str, dict[str, Any]], None] | None = None,
        resend_after_seconds: float = 30.0,
    ) -> None:
        self._settings = settings
        self._outbox = outbox
        self._status = status
        self._on_ack = on_ack
        self._resend_after = resend_after_seconds
        self._host = settings.mqtt.host
        self._port = settings.mqtt.port
        base = settings.topic_base
        self._base = base
        self._status_topic = f"{base}/status"
        self._ack_filter = f"{base}/ack/+"
        self._ack_prefix = f"{base}/ack/"
        self._publish_props = _json_properties(PacketTypes.PUBLISH)

        client = _new_client(settings, default_client_id(settings))
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.max_inflight_messages_set(MAX_IN_FLIGHT)
        client.reconnect_delay_set(RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS)
        client.will_set(
            self._status_topic,
            json.dumps({"state": "offline"}),
            qos=1,
            retain=True,
            properties=_json_properties(PacketTypes.WILLMESSAGE),
        )
        # Our callbacks catch everything themselves; this is the second line of defence
        # against an exception ending paho's network thread.
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_unexpected_message
        client.message_callback_add(self._ack_filter, self._on_ack_message)
        self._client = client

        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified when rows leave flight
        self._in_flight: dict[int, _InFlight] = {}  # outbox id -> entry
        self._mids: dict[int, int] = {}  # paho mid -> outbox id (or _STATUS_OWNER)
        self._unclaimed: dict[int, tuple[ReasonCode, float]] = {}  # PUBACK before we knew the mid
        self._stale: set[int] = set()  # other copies of a settled row, still pending in paho
        self._deleting: set[int] = set()  # acknowledged, outbox_delete running
        self._held: dict[int, float] = {}  # refused by the broker: outbox id -> retry at
        self._refusals: dict[int, int] = {}  # outbox id -> refusals so far
        self._status_refused_logged = False
        self._row_cap = MAX_IN_FLIGHT - 1

        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._acks_subscribed = threading.Event()  # the broker's SUBACK for P/ack/+
        self._next_status_at = 0.0
        self._connect_failures = 0
        self._refused_logged = False
        self._paho_thread: threading.Thread | None = None
        self._drain_thread: threading.Thread | None = None
        self._loop_death_logged = False
        self._stopped = False
        self.last_error: str | None = None
        """The latest delivery problem (connection lost or refused, publish refused), with
        its UTC time; for the status message."""

    # -- public API ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and start draining; never blocks on the broker."""
        if self._paho_thread is not None:
            raise RuntimeError("Publisher.start() called twice")
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
        self._client.connect_async(
            self._host,
            self._port,
            keepalive=self._settings.mqtt.keepalive_seconds,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        # paho exposes no public handle on its network thread; healthy() needs one.
        self._paho_thread = self._client._thread
        self._drain_thread = threading.Thread(
            target=self._drain_loop, name="mqtt-outbox-drain", daemon=True
        )
        self._drain_thread.start()
        logger.info(
            "MQTT publisher started for %s:%d, topics %s/…", self._host, self._port, self._base
        )

    def wake(self) -> None:
        """New rows were committed to the outbox: drain now."""
        self._wake.set()

    @property
    def connected(self) -> bool:
        """Connected to the broker, and paho's network thread is alive to use it."""
        thread = self._paho_thread
        return self._connected.is_set() and thread is not None and thread.is_alive()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_acks_subscribed(self, timeout: float) -> bool:
        """True once the broker has granted the subscription to dashboards' acks (acks
        published before that are not delivered to this session)."""
        return self._acks_subscribed.wait(timeout)

    @property
    def in_flight(self) -> int:
        """Outbox rows handed to the broker and not yet acknowledged."""
        with self._lock:
            return len(self._in_flight)

    def healthy(self) -> bool:
        """paho's network thread and the drain thread are alive (paho's can die silently)."""
        return (
            not self._stopped
            and self._paho_thread is not None
            and self._paho_thread.is_alive()
            and self._drain_thread is not None
            and self._drain_thread.is_alive()
        )

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
        if self._stopped or self._paho_thread is None:
            self._stopped = True
            return
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self._stopping.set()
        self._wake.set()
        if self._drain_thread is not None:
            self._drain_thread.join(left())

        if self.connected:
            flush_until = deadline - min(1.0, timeout / 4)
            with self._settled:
                self._settled.wait_for(
                    lambda: not (self._in_flight or self._deleting) or not self.connected,
                    timeout=max(0.0, flush_until - time.monotonic()),
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

        self._stopped = True
        paho_log = logging.getLogger(f"{__name__}.paho")
        race = _StopRaceFilter()
        paho_log.addFilter(race)
        self._client.disconnect()
        # loop_stop() joins without a timeout; paho's thread may sit in a connect attempt or
        # a reconnect back-off. Bound the wait; the thread is a daemon either way.
        stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(left() + 1.0)
        paho_log.removeFilter(race)
        if stopper.is_alive():
            logger.warning("paho's network thread did not end in time; leaving it behind")
        self._connected.clear()
        logger.info("MQTT publisher stopped (%s)", state)

    # -- publishing ----------------------------------------------------------------------

    def _status_payload(self, state: str) -> bytes:
        payload: dict[str, Any] = {"state": state}
        try:
            payload.update(self._status())
        except Exception:
            logger.exception("the status callback failed; publishing the state alone")
        payload["state"] = state
        payload["at"] = _utc_now()
        return json.dumps(payload, separators=(",", ":"), default=str).encode()

    def _publish_state(self, state: str) -> mqtt.MQTTMessageInfo | None:
        self._next_status_at = time.monotonic() + self._settings.mqtt.status_interval_seconds
        info = self._client.publish(
            self._status_topic,
            self._status_payload(state),
            qos=1,
            retain=True,
            properties=_json_properties(PacketTypes.PUBLISH),
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            logger.warning("could not queue the %r status: %s", state, mqtt.error_string(info.rc))
            return None
        self._track(info.mid, _STATUS_OWNER)
        return info

    def _send(self, message: OutboxMessage, *, resend: bool = False) -> None:
        """Hand one outbox row to paho and remember its mid."""
        try:
            info = self._client.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=False,
                properties=self._publish_props,
            )
        except ValueError as exc:  # bad topic or payload too large: this row can never go
            with self._lock:
                self._held[message.id] = time.monotonic() + RETRY_MAX_SECONDS
            logger.error("cannot publish %s: %s", self._describe(message), exc)
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # Not queued by paho (e.g. its queue is full): the row stays, tried next round.
            logger.warning(
                "paho did not take %s: %s", self._describe(message), mqtt.error_string(info.rc)
            )
            return
        # MQTT_ERR_NO_CONN: paho keeps the message and sends it after reconnecting.
        with self._lock:
            entry = self._in_flight.get(message.id)
            if entry is None and resend:
                # The first copy was acknowledged while this one was being published.
                if self._unclaimed.pop(info.mid, None) is None:
                    self._stale.add(info.mid)
                return
            if entry is None:
                entry = self._in_flight[message.id] = _InFlight(message, time.monotonic())
            entry.sent_at = time.monotonic()
            entry.mids.add(info.mid)
        self._track(info.mid, message.id)

    def _track(self, mid: int, owner: int) -> None:
        """Record who owns ``mid``; settle it now if its PUBACK already arrived."""
        with self._lock:
            self._mids[mid] = owner
            self._stale.discard(mid)
            early = self._unclaimed.pop(mid, None)
        if early is not None:
            self._handle_puback(mid, early[0])

    # -- drain thread --------------------------------------------------------------------

    def _drain_loop(self) -> None:
        failing = False
        while not self._stopping.is_set():
            self._wake.wait(_DRAIN_WAIT_SECONDS if failing else self._until_next_due())
            self._wake.clear()
            if self._stopping.is_set():
                break
            self._check_paho_thread()
            try:
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
        with self._lock:
            due = [self._next_status_at, *self._held.values()]
            due += [e.sent_at + self._resend_after for e in self._in_flight.values()]
        wait = min(due) - time.monotonic()
        return min(max(wait, 0.01), _DRAIN_WAIT_SECONDS)

    def _check_paho_thread(self) -> None:
        thread = self._paho_thread
        if thread is not None and not thread.is_alive() and not self._loop_death_logged:
            self._loop_death_logged = True
            self._error("paho's network thread has died")
            logger.error("paho's network thread has died: nothing is delivered until a restart")

    def _drain_once(self) -> None:
        if not self.connected:
            return
        now = time.monotonic()
        if now >= self._next_status_at:
            self._publish_state("online")
        self._purge(now)
        self._resend_overdue(now)
        while self.connected and not self._stopping.is_set():
            with self._lock:
                room = self._row_cap - len(self._in_flight)
                exclude = set(self._in_flight) | self._deleting | set(self._held)
            if room <= 0:
                return
            rows = self._outbox.outbox_pending(room, exclude)
            for row in rows:
                self._send(row)
            if len(rows) < room:
                return

    def _purge(self, now: float) -> None:
        with self._lock:
            for message_id in [i for i, at in self._held.items() if at <= now]:
                del self._held[message_id]
            for mid in [
                m for m, (_, at) in self._unclaimed.items() if now - at > _UNCLAIMED_TTL_SECONDS
            ]:
                del self._unclaimed[mid]

    def _resend_overdue(self, now: float) -> None:
        with self._lock:
            overdue = [
                (entry.message, now - entry.sent_at)
                for entry in self._in_flight.values()
                if now - entry.sent_at >= self._resend_after
            ]
        for message, age in overdue:
            logger.warning(
                "no PUBACK for %s after %.0f s; publishing it again", self._describe(message), age
            )
            self._send(message, resend=True)

    # -- paho callbacks (network thread; each one catches everything) --------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason_code.is_failure:
                self._error(f"broker refused the connection: {reason_code}")
                if not self._refused_logged:
                    logger.error(
                        "MQTT broker %s:%d refused the connection: %s; retrying",
                        self._host,
                        self._port,
                        reason_code,
                    )
                self._refused_logged = True
                return
            logger.info(
                "connected to MQTT broker %s:%d (session present: %s)",
                self._host,
                self._port,
                flags.session_present,
            )
            self._connect_failures = 0
            self._refused_logged = False
            receive_maximum = getattr(properties, "ReceiveMaximum", 65535)
            self._row_cap = max(1, min(MAX_IN_FLIGHT, receive_maximum) - 1)
            self._connected.set()
            with self._lock:
                # paho resends its unacknowledged messages itself; restart their clocks.
                now = time.monotonic()
                for entry in self._in_flight.values():
                    entry.sent_at = now
            client.subscribe(self._ack_filter, qos=1)
            self._publish_state("online")
            self._wake.set()
        except Exception:
            logger.exception("error in the MQTT connect handler")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            self._connect_failures += 1
            self._error(f"cannot connect to {self._host}:{self._port}")
            if self._connect_failures == 1:
                logger.warning(
                    "cannot connect to MQTT broker %s:%d; retrying with back-off up to %d s",
                    self._host,
                    self._port,
                    RECONNECT_MAX_SECONDS,
                )
            else:
                logger.debug("MQTT connect attempt %d failed", self._connect_failures)
        except Exception:
            logger.exception("error in the MQTT connect-failure handler")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            was_connected = self._connected.is_set()
            self._connected.clear()
            self._acks_subscribed.clear()
            with self._settled:
                self._settled.notify_all()  # stop() need not wait for PUBACKs any more
            if self._stopped:
                logger.debug("disconnected from the MQTT broker")
            elif was_connected:
                self._error(f"lost the broker ({reason_code})")
                logger.warning(
                    "lost the MQTT broker %s:%d (%s); reconnecting",
                    self._host,
                    self._port,
                    reason_code,
                )
        except Exception:
            logger.exception("error in the MQTT disconnect handler")

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            self._handle_puback(mid, reason_code)
        except Exception:
            logger.exception("error while handling the PUBACK for mid %d", mid)

    def _handle_puback(self, mid: int, reason_code: ReasonCode) -> None:
        with self._lock:
            owner = self._mids.pop(mid, None)
            if owner is None:
                if mid in self._stale:  # another copy of this row was acknowledged first
                    self._stale.discard(mid)
                else:  # publish() has not returned to _send() yet; _track() claims it
                    self._unclaimed[mid] = (reason_code, time.monotonic())
                return
            if owner == _STATUS_OWNER:
                entry = None
            else:
                entry = self._in_flight.pop(owner, None)
                if entry is not None:
                    for other in entry.mids - {mid}:
                        self._mids.pop(other, None)
                        self._stale.add(other)
                    if not reason_code.is_failure:
                        self._deleting.add(owner)
        if owner == _STATUS_OWNER:
            self._settle_status(reason_code)
        elif entry is not None:
            if reason_code.is_failure:
                self._refused(entry.message, reason_code)
            else:
                self._delivered(entry.message)
        self._wake.set()

    def _delivered(self, message: OutboxMessage) -> None:
        try:
            self._outbox.outbox_delete(message.id)
        except Exception:
            logger.exception(
                "could not delete delivered %s from the outbox; it will be sent again",
                self._describe(message),
            )
        else:
            logger.debug("delivered %s", self._describe(message))
        finally:
            with self._settled:
                self._deleting.discard(message.id)
                self._refusals.pop(message.id, None)
                self._settled.notify_all()

    def _refused(self, message: OutboxMessage, reason_code: ReasonCode) -> None:
        with self._settled:
            count = self._refusals.get(message.id, 0) + 1
            self._refusals[message.id] = count
            self._error(f"broker refused a publish: {reason_code}")
            delay = min(self._resend_after * 2 ** (count - 1), RETRY_MAX_SECONDS)
            self._held[message.id] = time.monotonic() + delay
            self._settled.notify_all()
        if count == 1:
            logger.error(
                "the broker refused %s: %s (0x%02x); kept in the outbox, retrying with back-off",
                self._describe(message),
                reason_code,
                reason_code.value,
            )
        else:
            logger.debug(
                "the broker refused %s again (%d times): %s",
                self._describe(message),
                count,
                reason_code,
            )

    def _settle_status(self, reason_code: ReasonCode) -> None:
        if not reason_code.is_failure:
            self._status_refused_logged = False
        elif not self._status_refused_logged:
            self._status_refused_logged = True
            logger.error("the broker refused the status message: %s", reason_code)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        try:
            refused = [rc for rc in reason_codes if rc.is_failure]
            if refused:
                logger.error(
                    "the broker refused the subscription to %s: %s; acks will not arrive",
                    self._ack_filter,
                    refused[0],
                )
            else:
                self._acks_subscribed.set()
        except Exception:
            logger.exception("error in the MQTT subscribe handler")

    def _on_ack_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        uid = "?"
        try:
            uid = message.topic[len(self._ack_prefix) :]
            if not message.payload:
                logger.debug("ignoring an empty ack for study %s", uid)
                return
            try:
                ack = json.loads(message.payload)
            except ValueError:  # UnicodeDecodeError and JSONDecodeError both
                logger.warning("ignoring a malformed ack for study %s: not JSON", uid)
                return
            if not isinstance(ack, dict) or not isinstance(ack.get("alert_id"), str):
                logger.warning(
                    "ignoring a malformed ack for study %s: not an object with alert_id", uid
                )
                return
            logger.info("ack for study %s, alert %s", uid, ack["alert_id"])
            if self._on_ack is not None:
                self._on_ack(uid, ack)
        except Exception:
            logger.exception("error while handling the ack for study %s", uid)

    def _on_unexpected_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        logger.debug("ignoring a message on an unexpected topic")

    # -- logging helpers -----------------------------------------------------------------

    def _error(self, what: str) -> None:
        self.last_error = f"{_utc_now()} {what}"

    def _describe(self, message: OutboxMessage) -> str:
        """'study result <uid> (alert <id>, outbox #n)' — never payload contents."""
        rest = message.topic.removeprefix(f"{self._base}/")
        kind, _, uid = rest.partition("/")
        what = f"study result {uid}" if kind == "study" else f"{kind or 'message'} message"
        alert_id = None
        if kind == "study":
            try:
                data = json.loads(message.payload)
                alert_id = data.get("alert_id") if isinstance(data, dict) else None
            except ValueError:
                pass
        if isinstance(alert_id, str):
            return f"{what} (alert {alert_id}, outbox #{message.id})"
        return f"{what} (outbox #{message.id})"


def check_broker(settings: Settings, timeout: float = 5.0) -> None:
    """One connect attempt, as ``edge-agent check`` does; raises BrokerUnreachable.

    Uses its own client id (``…-check``) and a clean session so that it never takes over
    the session of a running agent.
    """
    host, port = settings.mqtt.host, settings.mqtt.port
    where = f"MQTT broker {host}:{port}"
    client = _new_client(settings, f"{default_client_id(settings)}-check")
    client.connect_timeout = timeout
    connack: list[ReasonCode] = []

    def on_connect(c: mqtt.Client, u: Any, f: Any, rc: ReasonCode, p: Any) -> None:
        connack.append(rc)

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=settings.mqtt.keepalive_seconds, clean_start=True)
    except OSError as exc:  # refused, unresolvable, timed out, TLS handshake (ssl.SSLError)
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise BrokerUnreachable(f"cannot reach {where}: {reason}") from exc
    try:
        deadline = time.monotonic() + timeout
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        while not connack and time.monotonic() < deadline:
            rc = client.loop(timeout=0.1)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not connack:
                raise BrokerUnreachable(
                    f"{where} closed the connection before accepting it: {mqtt.error_string(rc)}"
                )
        if not connack:
            raise BrokerUnreachable(f"{where} did not answer the MQTT CONNECT within {timeout:g} s")
        if connack[0].is_failure:
            raise BrokerUnreachable(f"{where} refused the connection: {connack[0]}")
    finally:
        client.disconnect()
