"""The MQTT side of the agent: outbox delivery, retained status, Will, acks.

Results are written to the durable outbox (``store.py``) before anything is published; the
:class:`Publisher` drains it and deletes a row only when the broker's PUBACK says it was
accepted. Topics (``P = settings.topic_base``)::

    P/study/{StudyInstanceUID}   agent →  QoS 1, not retained   rows from the outbox
    P/rejected                   agent →  QoS 1, not retained   rows from the outbox
    P/status                     agent →  QoS 1, retained       online | stopped; Will: offline
    P/ack/{StudyInstanceUID}     → agent  QoS 1                 {"alert_id", "by", "at"}

Threads: paho's network thread (``loop_start``) runs every callback, PUBACKs included, so
``Outbox.outbox_delete`` and ``on_ack`` are called on it. The drain thread (ours) fetches
pending rows in batches, keeps at most :data:`MAX_IN_FLIGHT` of them handed to paho,
republishes rows whose PUBACK is overdue, replaces the paho client when needed (below) and
refreshes the retained status. Neither thread holds our lock while calling into paho, so
the lock order is never inverted. Callbacks of a replaced client are ignored.

Delivery is at least once: a row can be published again after a reconnect, an overdue
PUBACK or a failed delete, and receivers dedup on ``alert_id`` (and ``notify_count`` for
re-notifications). Order per study holds: the store offers a study topic's next row only
once the one before has been acknowledged and deleted (or set aside, below), so every copy
of revision n is handed to paho (whose queue is FIFO) before revision n+1.

Broker outages: paho's network thread reconnects with back-off (``reconnect_delay_set``:
1 s doubling to :data:`RECONNECT_MAX_SECONDS`, reset on each CONNACK); rows queued
meanwhile wait in the outbox and drain after the reconnect; the outbox is what survives a
restart of the process.

One message never blocks the others (``strikes.py``): a row the broker refuses (PUBACK
reason >= 0x80) or that breaks the connection whenever it is alone in flight is *set
aside* after ``mqtt.max_attempts`` attempts: it stays in the outbox (marked, counted in the
status), is tried again every ``mqtt.set_aside_retry_seconds`` and at start, and the rest
flows. A row whose topic the broker could never accept (:func:`topic_problem`) is set aside
at once. paho keeps unacknowledged QoS 1 messages in memory and resends them after a
reconnect, a poison message with them; so when the connection breaks with outbox rows in
flight, the client is replaced by a fresh one (the outbox holds every row anyway) and those
rows go again one at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..config import Settings
from ..errors import BrokerUnreachable, ConfigError
from ..store import AckOutcome, OutboxMessage
from ..text import has_control, printable
from .acks import Ack, AckLog, AckRefused, parse_ack
from .strikes import Strikes

__all__ = [
    "MAX_IN_FLIGHT",
    "Ack",
    "Outbox",
    "OutboxMessage",
    "Publisher",
    "check_broker",
    "silent_broker",
    "topic_problem",
]

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
MAX_TOPIC_BYTES = 65535

_DRAIN_WAIT_SECONDS = 1.0
_UNCLAIMED_TTL_SECONDS = 60.0
_STATUS_OWNER = -1  # owner of the mids of status messages (outbox ids are positive)


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


def default_client_id(settings: Settings) -> str:
    return settings.mqtt.client_id or f"edge-agent-{settings.site}-{settings.device_id}"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _json_properties(packet_type: int) -> Properties:
    props = Properties(packet_type)
    props.ContentType = CONTENT_TYPE
    return props


def topic_problem(topic: str) -> str | None:
    """Why the broker could never accept a PUBLISH to ``topic`` (None: it can).

    MQTT 5 (4.7.3, 1.5.4): a topic name is 1 to 65535 bytes of well-formed UTF-8 without
    NUL, without the wildcards ``+`` and ``#``; Mosquitto also drops the connection on other
    control characters."""
    if not topic:
        return "empty topic"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates
        return "topic is not valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return f"topic of {size} bytes (limit {MAX_TOPIC_BYTES})"
    if "\0" in topic:
        return "topic holds a NUL character"
    if has_control(topic):
        return "topic holds a control character"
    if "+" in topic or "#" in topic:
        return "topic holds a wildcard ('+' or '#')"
    return None


def silent_broker(host: str, port: int, seconds: float) -> str:
    """One wording for ``edge-agent check`` and the daemon's log and status."""
    return (
        f"MQTT broker {host}:{port} accepts connections but did not answer the MQTT CONNECT "
        f"within {seconds:g} s"
    )


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


class _NotConnectedFilter(logging.Filter):
    """Drops paho's "Client is not connected" error.

    paho's network loop logs it once after every lost connection and after our own
    disconnect() (the socket is closed between two loop iterations). It says nothing about
    delivery (the outbox holds what was not acknowledged, and our own lines say what
    happened), and an ERROR line on every clean shutdown or every 30 s of a silent broker
    would teach operators to ignore ERROR lines. On paho's logger while a Publisher runs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


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
        self._settings = settings
        self._outbox = outbox
        self._status = status
        self._on_ack = on_ack
        self._resend_after = resend_after_seconds
        self._host = cfg.host
        self._port = cfg.port
        base = settings.topic_base
        self._base = base
        self._status_topic = f"{base}/status"
        self._ack_filter = f"{base}/ack/+"
        self._ack_prefix = f"{base}/ack/"
        self._publish_props = _json_properties(PacketTypes.PUBLISH)
        self._retry_set_aside_every = cfg.set_aside_retry_seconds
        self._stalled_after = cfg.stalled_after_seconds
        self._paho_log = logging.getLogger(f"{__name__}.paho")
        self._not_connected_filter = _NotConnectedFilter()

        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified when rows leave flight
        self._in_flight: dict[int, _InFlight] = {}  # outbox id -> entry
        self._mids: dict[int, int] = {}  # paho mid -> outbox id (or _STATUS_OWNER)
        self._unclaimed: dict[int, tuple[ReasonCode, float]] = {}  # PUBACK before we knew the mid
        self._stale: set[int] = set()  # other copies of a settled row, still pending in paho
        self._deleting: set[int] = set()  # acknowledged, outbox_delete running
        self._held: dict[int, float] = {}  # refused by the broker: outbox id -> retry at
        self.strikes = Strikes(cfg.max_attempts)
        self.acks = AckLog()
        self._status_refused_logged = False
        self._row_cap = MAX_IN_FLIGHT - 1

        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._acks_subscribed = threading.Event()  # the broker's SUBACK for P/ack/+
        self._next_status_at = 0.0
        self._next_set_aside_retry = 0.0  # at start
        self._replace_at: float | None = None  # replace the paho client then (drain thread)
        self._connect_failures = 0
        self._refused_logged = False
        self._silent_logged = False
        self._connecting_since: float | None = None  # on_pre_connect of the current attempt
        self._connack_at: float | None = None  # latest CONNACK that accepted us
        self._progress_at = time.monotonic()  # a row left the outbox, or none was waiting
        self._network_thread: threading.Thread | None = None  # seen in paho's callbacks
        self._drain_thread: threading.Thread | None = None
        self._started = False
        self._loop_death_logged = False
        self._stopped = False
        self.last_error: str | None = None
        """The latest delivery problem (connection lost or refused, publish refused), with
        its UTC time; for the status message."""
        self._client = self._build_client()

    def _build_client(self) -> mqtt.Client:
        client = _new_client(self._settings, default_client_id(self._settings))
        client.enable_logger(self._paho_log)
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
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_unexpected_message
        client.message_callback_add(self._ack_filter, self._on_ack_message)
        return client

    def _start_client(self, client: mqtt.Client) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
        client.connect_async(
            self._host,
            self._port,
            keepalive=self._settings.mqtt.keepalive_seconds,
            clean_start=False,
            properties=props,
        )
        client.loop_start()

    def _current(self, client: mqtt.Client) -> bool:
        """True for a callback of the client in use (a replaced one's, or one about to be
        replaced, are ignored); notes the thread paho runs it on, the network thread that
        healthy() watches."""
        if client is not self._client or self._replace_at is not None:
            return False
        self._network_thread = threading.current_thread()
        return True

    # -- public API ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and start draining; never blocks on the broker."""
        if self._started:
            raise RuntimeError("Publisher.start() called twice")
        self._started = True
        self._paho_log.addFilter(self._not_connected_filter)
        self._start_client(self._client)
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

    def _network_alive(self) -> bool:
        """paho's network thread has not died (before its first callback: assumed alive;
        while the client is being replaced: alive)."""
        thread = self._network_thread
        return thread is None or thread.is_alive()

    @property
    def connected(self) -> bool:
        """Connected to the broker, and paho's network thread is alive to use it."""
        return self._connected.is_set() and self._network_alive()

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
            self._started
            and not self._stopped
            and self._network_alive()
            and self._drain_thread is not None
            and self._drain_thread.is_alive()
        )

    def stalled(self) -> str | None:
        """Why delivery is stuck, or None: rows wait, the broker accepted a connection
        within ``mqtt.stalled_after_seconds``, and not one row has left the outbox (been
        acknowledged or set aside) in that time. A plain outage is not a stall."""
        now = time.monotonic()
        connack = self._connack_at
        if now - self._progress_at < self._stalled_after or connack is None:
            return None
        if not self._connected.is_set() and now - connack > self._stalled_after:
            return None
        return (
            f"the outbox has not moved for over {self._stalled_after:g} s although the "
            f"MQTT broker {self._host}:{self._port} accepts the connection"
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
        if self._stopped or not self._started:
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
        self._stop_client(self._client, left() + 1.0)
        self._paho_log.removeFilter(self._not_connected_filter)
        self._connected.clear()
        self.acks.flush()
        logger.info("MQTT publisher stopped (%s)", state)

    def _stop_client(self, client: mqtt.Client, timeout: float) -> None:
        client.disconnect()
        # loop_stop() joins without a timeout; paho's thread may sit in a connect attempt or
        # a reconnect back-off. Bound the wait; the thread is a daemon either way.
        stopper = threading.Thread(target=client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            logger.warning("paho's network thread did not end in time; leaving it behind")

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
        client = self._client
        info = client.publish(
            self._status_topic,
            self._status_payload(state),
            qos=1,
            retain=True,
            properties=_json_properties(PacketTypes.PUBLISH),
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            logger.warning("could not queue the %r status: %s", state, mqtt.error_string(info.rc))
            return None
        self._track(client, info.mid, _STATUS_OWNER)
        return info

    def _send(self, message: OutboxMessage, *, resend: bool = False) -> None:
        """Hand one outbox row to paho and remember its mid.

        The row is entered as in flight *before* publish(): the broker may drop the
        connection on this very PUBLISH before publish() has returned, and the disconnect
        handler must then know the row was on its way."""
        problem = topic_problem(message.topic)
        if problem is not None:
            self._set_aside(message, problem)
            return
        client = self._client
        with self._lock:
            if self._replace_at is not None:
                return  # the connection broke: offered again once the client is replaced
            entry = self._in_flight.get(message.id)
            if entry is None and resend:
                return  # acknowledged meanwhile
            created = entry is None
            if entry is None:
                entry = self._in_flight[message.id] = _InFlight(message, time.monotonic())
            entry.sent_at = time.monotonic()
        try:
            info = client.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=False,
                properties=self._publish_props,
            )
        except ValueError as exc:  # payload too large (or a topic paho refuses): never goes
            self._unsent(message.id, entry, created)
            self._set_aside(message, f"paho cannot publish it: {exc}")
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # Not queued by paho (e.g. its queue is full): the row stays, tried next round.
            self._unsent(message.id, entry, created)
            logger.warning(
                "paho did not take %s: %s", self._describe(message), mqtt.error_string(info.rc)
            )
            return
        # MQTT_ERR_NO_CONN: paho keeps the message and sends it after reconnecting.
        with self._settled:
            if client is not self._client or self._replace_at is not None:
                # The connection broke meanwhile: if the disconnect handler saw the row, it
                # is a suspect now; if not, it is offered again after the replacement.
                if self._in_flight.get(message.id) is entry:
                    del self._in_flight[message.id]
                    self._settled.notify_all()
                return
            if self._in_flight.get(message.id) is not entry:
                # Another copy was acknowledged while this one was being published.
                if self._unclaimed.pop(info.mid, None) is None:
                    self._stale.add(info.mid)
                return
            entry.mids.add(info.mid)
        self._track(client, info.mid, message.id)

    def _unsent(self, message_id: int, entry: _InFlight, created: bool) -> None:
        """publish() did not take the row: it is not in flight after all."""
        if not created:
            return
        with self._settled:
            if self._in_flight.get(message_id) is entry:
                del self._in_flight[message_id]
            self._settled.notify_all()

    def _track(self, client: mqtt.Client, mid: int, owner: int) -> None:
        """Record who owns ``mid``; settle it now if its PUBACK already arrived."""
        with self._lock:
            if client is not self._client:
                return
            self._mids[mid] = owner
            self._stale.discard(mid)
            early = self._unclaimed.pop(mid, None)
        if early is not None:
            self._handle_puback(mid, early[0])

    def _set_aside(self, message: OutboxMessage, reason: str) -> None:
        """Keep the row in the outbox, out of the way; the rest flows."""
        self.strikes.forget(message.id)
        with self._settled:
            self._held.pop(message.id, None)
            self._settled.notify_all()
        self._error(f"set aside {self._describe(message)}: {reason}")
        try:
            first = self._outbox.outbox_set_aside(message.id, reason)
        except Exception:
            # Not marked: it comes back with the next batch and is set aside again then.
            logger.exception("could not set aside %s", self._describe(message))
            return
        self._progress_at = time.monotonic()
        if first:
            logger.error(
                "set aside %s: %s; it stays in the outbox and is tried again every %g s "
                "and at start; the other messages go on",
                self._describe(message),
                reason,
                self._retry_set_aside_every,
            )
        else:
            logger.warning("%s set aside again: %s", self._describe(message), reason)

    # -- drain thread --------------------------------------------------------------------

    def _drain_loop(self) -> None:
        failing = False
        while not self._stopping.is_set():
            self._wake.wait(_DRAIN_WAIT_SECONDS if failing else self._until_next_due())
            self._wake.clear()
            if self._stopping.is_set():
                break
            self._check_network_thread()
            self.acks.flush()
            try:
                self._replace_client_if_due()
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

    def _check_network_thread(self) -> None:
        if not self._network_alive() and not self._loop_death_logged:
            self._loop_death_logged = True
            self._error("paho's network thread has died")
            logger.error("paho's network thread has died: nothing is delivered until a restart")

    def _replace_client_if_due(self) -> None:
        """After the connection broke with outbox rows in flight: a fresh paho client, so
        that paho does not resend them all at once (a poison message among them)."""
        at = self._replace_at
        if at is None or time.monotonic() < at:
            return
        old = self._client
        new = self._build_client()
        with self._lock:
            self._client = new  # from now on the old client's callbacks are ignored
            self._network_thread = None
            self._mids.clear()
            self._unclaimed.clear()
            self._stale.clear()
        self._replace_at = None
        self._stop_client(old, 2.0)
        logger.debug("MQTT client replaced; connecting again")
        self._start_client(new)

    def _drain_once(self) -> None:
        now = time.monotonic()
        if not self.connected:
            self._note_idle()
            return
        if now >= self._next_status_at:
            self._publish_state("online")
        self._purge(now)
        self._resend_overdue(now)
        if now >= self._next_set_aside_retry and not self.strikes.suspects():
            self._next_set_aside_retry = now + self._retry_set_aside_every
            retried = self.strikes.retry(self._outbox.outbox_set_aside_messages())
            if retried:
                logger.info("trying %d set-aside outbox messages again, one at a time", retried)
        suspect = self.strikes.next_suspect()
        if suspect is not None:
            # Probation: the suspect goes alone, so that a broken connection names it.
            with self._lock:
                busy = bool(self._in_flight or self._deleting)
            if not busy:
                self._send(suspect)
            return
        while self.connected and not self._stopping.is_set():
            with self._lock:
                room = self._row_cap - len(self._in_flight)
                exclude = set(self._in_flight) | self._deleting | set(self._held)
            if room <= 0:
                return
            rows = self._outbox.outbox_pending(room, exclude)
            for row in rows:
                self._send(row)
            if not rows and not exclude:
                self._progress_at = time.monotonic()  # nothing waits: nothing is stuck
            if len(rows) < room:
                return

    def _note_idle(self) -> None:
        """While disconnected: an outbox with nothing to deliver is not stuck either."""
        with self._lock:
            busy = bool(self._in_flight or self._deleting or self._held)
        if not busy and not self.strikes.suspects() and not self._outbox.outbox_pending(1, ()):
            self._progress_at = time.monotonic()

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

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        if self._current(client):
            self._connecting_since = time.monotonic()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if not self._current(client):
                return
            self._connecting_since = None
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
            self._refused_logged = self._silent_logged = False
            self._connack_at = time.monotonic()
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
            if not self._current(client):
                return
            self._connecting_since = None
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
            if not self._current(client):
                return
            was_connected = self._connected.is_set()
            self._connected.clear()
            self._acks_subscribed.clear()
            with self._settled:
                self._settled.notify_all()  # stop() need not wait for PUBACKs any more
            if self._stopped:
                logger.debug("disconnected from the MQTT broker")
                return
            if not was_connected:
                self._no_connack(reason_code)
                return
            self._error(f"lost the broker ({reason_code})")
            logger.warning(
                "lost the MQTT broker %s:%d (%s); reconnecting",
                self._host,
                self._port,
                reason_code,
            )
            if not self._stopping.is_set():
                self._connection_lost(client, reason_code)
        except Exception:
            logger.exception("error in the MQTT disconnect handler")

    def _no_connack(self, reason_code: ReasonCode) -> None:
        """The connection ended before the broker's CONNACK: silent, or closed at once."""
        since = self._connecting_since
        self._connecting_since = None
        if since is None:  # a CONNACK refused us (said by _on_connect), or not ours to say
            return
        waited = time.monotonic() - since
        keepalive = self._settings.mqtt.keepalive_seconds
        if waited >= 0.9 * keepalive:
            what = silent_broker(self._host, self._port, round(waited))
        else:
            what = (
                f"MQTT broker {self._host}:{self._port} closed the connection before "
                f"accepting it ({reason_code})"
            )
        self._error(what)
        if not self._silent_logged:
            self._silent_logged = True
            logger.error("%s; retrying with back-off, logged again once it has answered", what)

    def _connection_lost(self, client: mqtt.Client, reason_code: ReasonCode) -> None:
        """The connection broke after CONNACK. Outbox rows in flight: a strike for a row that
        was alone, suspects otherwise; paho's copies are dropped with the client."""
        with self._settled:
            rows = sorted((e.message for e in self._in_flight.values()), key=lambda m: m.id)
            if not rows:
                return  # paho resends the status message itself; nothing to attribute
            self._in_flight.clear()
            self._settled.notify_all()
        culprit = self.strikes.connection_lost(rows)
        if len(rows) == 1 and culprit is None:
            logger.info(
                "%s was alone in flight when the connection broke (attempt %d of %d)",
                self._describe(rows[0]),
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
            self._set_aside(
                culprit,
                f"the broker closed the connection each of the {self.strikes.max_attempts} "
                f"times it was sent alone ({reason_code})",
            )
        # A fresh client (made on the drain thread) forgets paho's unacknowledged copies.
        # loop_stop() on paho's own thread does not join; it makes this client's loop end
        # instead of reconnecting and resending them (disconnect() would not: paho marks a
        # connection reset as lost after this callback returns, and reconnects). Its thread
        # ends on purpose: not a death for healthy() (nor are its last callbacks ours).
        self._replace_at = time.monotonic() + RECONNECT_MIN_SECONDS
        self._network_thread = None
        client.loop_stop()
        self._wake.set()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if self._current(client):
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
            self._progress_at = time.monotonic()
            logger.debug("delivered %s", self._describe(message))
        finally:
            self.strikes.forget(message.id)
            with self._settled:
                self._deleting.discard(message.id)
                self._settled.notify_all()

    def _refused(self, message: OutboxMessage, reason_code: ReasonCode) -> None:
        count = self.strikes.failed(message.id)
        self._error(f"broker refused a publish: {reason_code}")
        if self.strikes.exhausted(count):
            self._set_aside(
                message,
                f"the broker refused it {count} times: {reason_code} (0x{reason_code.value:02x})",
            )
            return
        with self._settled:
            delay = min(self._resend_after * 2 ** (count - 1), RETRY_MAX_SECONDS)
            self._held[message.id] = time.monotonic() + delay
            self._settled.notify_all()
        if count == 1:
            logger.error(
                "the broker refused %s: %s (0x%02x); kept in the outbox, retrying with "
                "back-off, set aside after %d attempts",
                self._describe(message),
                reason_code,
                reason_code.value,
                self.strikes.max_attempts,
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
            if not self._current(client):
                return
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
        """An ack is data: checked (acks.py), logged with its text escaped, one line per
        real ack; bad and unknown ones are counted and logged rate-limited."""
        uid = "?"
        try:
            if not self._current(client):
                return
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

    def _on_unexpected_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        logger.debug("ignoring a message on an unexpected topic")

    # -- logging helpers -----------------------------------------------------------------

    def _error(self, what: str) -> None:
        self.last_error = f"{_utc_now()} {what}"

    def _describe(self, message: OutboxMessage) -> str:
        """'study result <uid> (alert <id>, outbox #n)' — never payload contents; the
        topic's text escaped (it may be what broke delivery)."""
        rest = message.topic.removeprefix(f"{self._base}/")
        kind, _, uid = rest.partition("/")
        kind, uid = printable(kind, 40), printable(uid, 80)
        what = f"study result {uid}" if kind == "study" else f"{kind or 'message'} message"
        alert_id = None
        if kind == "study":
            try:
                data = json.loads(message.payload)
                alert_id = data.get("alert_id") if isinstance(data, dict) else None
            except (ValueError, RecursionError):
                pass
        if isinstance(alert_id, str):
            return f"{what} (alert {printable(alert_id, 64)}, outbox #{message.id})"
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
            raise BrokerUnreachable(silent_broker(host, port, timeout))
        if connack[0].is_failure:
            raise BrokerUnreachable(f"{where} refused the connection: {connack[0]}")
    finally:
        client.disconnect()
