"""Real MQTT peers for tests: a Mosquitto broker on a free loopback port and a subscriber.

``Mosquitto`` runs ``mosquitto -c <generated conf>`` with persistence in its own folder, so
``stop()`` followed by ``start()`` (same port) keeps retained messages and persistent
sessions; ``kill()`` loses what was not yet saved, like a crash. ``pause()``/``resume()``
(SIGSTOP/SIGCONT) hold the broker's answers (PUBACKs) while TCP stays up.

``Subscriber`` is a paho v2 client subscribed to one topic filter at QoS 1 that records
every message; with ``persistent=True`` the broker keeps its session across disconnects and
broker restarts, so a test can prove delivery of messages published meanwhile.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.devbroker import HOST, Mosquitto, free_port, port_open

__all__ = ["HOST", "Mosquitto", "Received", "Subscriber", "free_port", "port_open"]


class Received(NamedTuple):
    topic: str
    payload: bytes
    properties: Properties | None
    retain: bool
    received_at: float = 0.0
    """time.monotonic() when the subscriber received it."""

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def content_type(self) -> str | None:
        return getattr(self.properties, "ContentType", None)


class Subscriber:
    """A paho v2 client that records every message on ``topic_filter`` (QoS 1)."""

    def __init__(
        self,
        broker: Mosquitto,
        topic_filter: str,
        *,
        persistent: bool = False,
        client_id: str | None = None,
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.topic_filter = topic_filter
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(1, 1)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300 if persistent else 0
        self.client.connect(
            broker.host, broker.port, keepalive=10, clean_start=not persistent, properties=props
        )
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"subscriber to {topic_filter} got no SUBACK")

    def _on_connect(self, client: mqtt.Client, u: Any, flags: Any, rc: Any, p: Any) -> None:
        client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(self, client: mqtt.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._messages.append(
                Received(
                    msg.topic,
                    bytes(msg.payload),
                    msg.properties,
                    bool(msg.retain),
                    time.monotonic(),
                )
            )
            self._cond.notify_all()

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(
        self,
        predicate: Callable[[Received], bool] = lambda m: True,
        timeout: float = 5.0,
        count: int = 1,
    ) -> list[Received]:
        """Wait until ``count`` messages match; returns them; AssertionError on timeout."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(1 for m in self._messages if predicate(m)) >= count, timeout
            )
            matching = [m for m in self._messages if predicate(m)]
            if not ok:
                seen = [m.topic for m in self._messages]
                raise AssertionError(
                    f"{len(matching)}/{count} matching messages on {self.topic_filter} after "
                    f"{timeout} s; received topics: {seen}"
                )
            return matching

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        """Publish as this client (e.g. a dashboard's ack) and wait for the PUBACK."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=5.0)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class SilentListener:
    """Accepts TCP connections and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()
