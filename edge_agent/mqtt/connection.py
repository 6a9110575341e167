"""The connection to the broker: the paho client in use, its network thread, what its
connection callbacks learn, and its replacement by a fresh client.

paho's network thread runs every callback; each is wrapped by :meth:`Connection._heard`,
which drops the callbacks of a replaced client (or of one about to be replaced) and catches
whatever a handler raises (an exception would end paho's thread). The drain thread replaces
the client (:meth:`Connection.replace_if_due`); the events and attributes read by other
threads are set by one thread each (said where they are made).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..config import Settings
from .client import (
    MAX_IN_FLIGHT,
    RECONNECT_MAX_SECONDS,
    RECONNECT_MIN_SECONDS,
    SESSION_EXPIRY_SECONDS,
    default_client_id,
    json_properties,
    new_client,
    silent_broker,
    stop_client,
)
from .flight import Flight

logger = logging.getLogger(__name__)

PAHO_LOGGER = "edge_agent.mqtt.paho"


class Connection:
    """The paho client in use and its connection's state.

    Handed: ``flight`` (the in-flight bookkeeping: a new client starts a new session, a
    CONNACK restarts the PUBACK clocks, a disconnect wakes ``stop()``'s wait), ``error``
    (notes a delivery problem), ``connected`` (called after an accepted CONNACK and the ack
    subscription), ``lost`` (the connection broke after CONNACK: returns True when rows
    were in flight, so that the client is to be replaced), ``wake`` (the drain thread has
    a client to replace), ``puback`` and ``ack`` (a PUBACK,
    a message on ``ack_filter``)."""

    def __init__(
        self,
        settings: Settings,
        flight: Flight,
        *,
        status_topic: str,
        ack_filter: str,
        error: Callable[[str], None],
        connected: Callable[[], None],
        lost: Callable[[ReasonCode], bool],
        wake: Callable[[], None],
        puback: Callable[[int, ReasonCode], None],
        ack: Callable[[mqtt.MQTTMessage], None],
    ) -> None:
        self._settings = settings
        self._flight = flight
        self.host, self.port = settings.mqtt.host, settings.mqtt.port
        self._status_topic = status_topic
        self._ack_filter = ack_filter
        self._error = error
        self._on_connected = connected
        self._on_lost = lost
        self._wake = wake
        self._on_puback = puback
        self._on_ack = ack
        self.paho_log = logging.getLogger(PAHO_LOGGER)
        # Set on paho's network thread (CONNACK, SUBACK, disconnect); read by any.
        self.connected = threading.Event()
        self.acks_subscribed = threading.Event()  # the broker's SUBACK for P/ack/+
        self.connack_at: float | None = None  # latest CONNACK that accepted us
        self.row_cap = MAX_IN_FLIGHT - 1  # below the broker's Receive Maximum
        # Set by the owner's stop(), read by the callbacks.
        self.stopping = threading.Event()
        self.stopped = False
        # Set on paho's thread when the connection broke with rows in flight; the drain
        # thread replaces the client then and clears it.
        self.replace_at: float | None = None
        self._network_thread: threading.Thread | None = None  # seen in paho's callbacks
        self._connecting_since: float | None = None  # on_pre_connect of the current attempt
        self._connect_failures = 0
        self._refused_logged = self._silent_logged = False
        self.client = self._build_client()
        flight.new_session(self.client)

    # -- the client -----------------------------------------------------------------------

    def _build_client(self) -> mqtt.Client:
        client = new_client(self._settings, default_client_id(self._settings))
        client.enable_logger(self.paho_log)
        client.max_inflight_messages_set(MAX_IN_FLIGHT)
        client.reconnect_delay_set(RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS)
        client.will_set(
            self._status_topic,
            json.dumps({"state": "offline"}),
            qos=1,
            retain=True,
            properties=json_properties(PacketTypes.WILLMESSAGE),
        )
        # Our callbacks catch everything (_heard); this is the second line of defence
        # against an exception ending paho's network thread.
        client.suppress_exceptions = True
        client.on_pre_connect = self._heard("pre-connect", self._connecting)
        client.on_connect = self._heard("connect", self._connack)
        client.on_connect_fail = self._heard("connect-failure", self._connect_failed)
        client.on_disconnect = self._heard(
            "disconnect", lambda client, flags, reason_code, props: self._gone(client, reason_code)
        )
        client.on_publish = self._heard(
            "PUBACK", lambda client, mid, reason_code, props: self._on_puback(mid, reason_code)
        )
        client.on_subscribe = self._heard("subscribe", self._subscribed)
        client.on_message = self._heard("message", self._unexpected_message)
        client.message_callback_add(
            self._ack_filter, self._heard("ack", lambda client, message: self._on_ack(message))
        )
        return client

    def _heard(self, what: str, handler: Callable[..., None]) -> Callable[..., None]:
        """paho's callback for ``handler(client, *args)`` (``userdata`` left out): only the
        client in use is heard, and nothing raises out of it."""

        def callback(client: mqtt.Client, userdata: Any, *args: Any) -> None:
            try:
                if self._current(client):
                    handler(client, *args)
            except Exception:
                logger.exception("error in the MQTT %s handler", what)

        return callback

    def _current(self, client: mqtt.Client) -> bool:
        """True for a callback of the client in use (a replaced one's, or one about to be
        replaced, are ignored); notes the thread paho runs it on, the network thread that
        healthy() watches."""
        if client is not self.client or self.replace_at is not None:
            return False
        self._network_thread = threading.current_thread()
        return True

    def start(self) -> None:
        """Connect in the background (paho's network thread)."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
        self.client.connect_async(
            self.host,
            self.port,
            keepalive=self._settings.mqtt.keepalive_seconds,
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()

    def stop(self, timeout: float) -> None:
        """Disconnect and end the network thread (waiting at most ``timeout``)."""
        self.stopped = True
        stop_client(self.client, timeout)
        self.connected.clear()

    def network_alive(self) -> bool:
        """paho's network thread has not died (before its first callback: assumed alive;
        while the client is being replaced: alive)."""
        thread = self._network_thread
        return thread is None or thread.is_alive()

    def replace_if_due(self) -> None:
        """After the connection broke with outbox rows in flight: a fresh paho client, so
        that paho does not resend them all at once (a poison message among them)."""
        at = self.replace_at
        if at is None or time.monotonic() < at:
            return
        old, new = self.client, self._build_client()
        self.client = new  # from now on the old client's callbacks are ignored
        self._network_thread = None
        self._flight.new_session(new)
        self.replace_at = None
        stop_client(old, 2.0)
        logger.debug("MQTT client replaced; connecting again")
        self.start()

    # -- paho callbacks (network thread, through _heard) ----------------------------------

    def _connecting(self, client: mqtt.Client) -> None:
        self._connecting_since = time.monotonic()

    def _connack(
        self,
        client: mqtt.Client,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connecting_since = None
        if reason_code.is_failure:
            self._error(f"broker refused the connection: {reason_code}")
            if not self._refused_logged:
                logger.error(
                    "MQTT broker %s:%d refused the connection: %s; retrying",
                    self.host,
                    self.port,
                    reason_code,
                )
            self._refused_logged = True
            return
        logger.info(
            "connected to MQTT broker %s:%d (session present: %s)",
            self.host,
            self.port,
            flags.session_present,
        )
        self._connect_failures = 0
        self._refused_logged = self._silent_logged = False
        self.connack_at = time.monotonic()
        receive_maximum = getattr(properties, "ReceiveMaximum", 65535)
        self.row_cap = max(1, min(MAX_IN_FLIGHT, receive_maximum) - 1)
        self.connected.set()
        self._flight.restart_clocks()  # paho resends its unacknowledged messages itself
        client.subscribe(self._ack_filter, qos=1)
        self._on_connected()

    def _connect_failed(self, client: mqtt.Client) -> None:
        self._connecting_since = None
        self._connect_failures += 1
        self._error(f"cannot connect to {self.host}:{self.port}")
        if self._connect_failures == 1:
            logger.warning(
                "cannot connect to MQTT broker %s:%d; retrying with back-off up to %d s",
                self.host,
                self.port,
                RECONNECT_MAX_SECONDS,
            )
        else:
            logger.debug("MQTT connect attempt %d failed", self._connect_failures)

    def _gone(self, client: mqtt.Client, reason_code: ReasonCode) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.acks_subscribed.clear()
        self._flight.wake_waiters()  # stop() need not wait for PUBACKs any more
        if self.stopped:
            logger.debug("disconnected from the MQTT broker")
            return
        if not was_connected:
            self._no_connack(reason_code)
            return
        self._error(f"lost the broker ({reason_code})")
        logger.warning(
            "lost the MQTT broker %s:%d (%s); reconnecting", self.host, self.port, reason_code
        )
        if self.stopping.is_set() or not self._on_lost(reason_code):
            return
        # A fresh client (made on the drain thread) forgets paho's unacknowledged copies.
        # loop_stop() on paho's own thread does not join; it makes this client's loop end
        # instead of reconnecting and resending them (disconnect() would not: paho marks a
        # connection reset as lost after this callback returns, and reconnects). Its thread
        # ends on purpose: not a death for healthy() (nor are its last callbacks ours).
        self.replace_at = time.monotonic() + RECONNECT_MIN_SECONDS
        self._network_thread = None
        client.loop_stop()
        self._wake()  # the drain thread replaces it

    def _no_connack(self, reason_code: ReasonCode) -> None:
        """The connection ended before the broker's CONNACK: silent, or closed at once."""
        since = self._connecting_since
        self._connecting_since = None
        if since is None:  # a CONNACK refused us (said by _connack), or not ours to say
            return
        waited = time.monotonic() - since
        if waited >= 0.9 * self._settings.mqtt.keepalive_seconds:
            what = silent_broker(self.host, self.port, round(waited))
        else:
            what = (
                f"MQTT broker {self.host}:{self.port} closed the connection before "
                f"accepting it ({reason_code})"
            )
        self._error(what)
        if not self._silent_logged:
            self._silent_logged = True
            logger.error("%s; retrying with back-off, logged again once it has answered", what)

    def _subscribed(
        self,
        client: mqtt.Client,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            logger.error(
                "the broker refused the subscription to %s: %s; acks will not arrive",
                self._ack_filter,
                refused[0],
            )
        else:
            self.acks_subscribed.set()

    def _unexpected_message(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        logger.debug("ignoring a message on an unexpected topic")
