"""The paho client as the agent uses it: MQTT v5, credentials and TLS from the config,
JSON properties, topic rules, and a stop that leaves no socket open."""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from ..config import Settings
from ..errors import ConfigError
from ..store import OutboxMessage
from ..text import has_control, printable

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


def default_client_id(settings: Settings) -> str:
    return settings.mqtt.client_id or f"edge-agent-{settings.site}-{settings.device_id}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def json_properties(packet_type: int) -> Properties:
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


def new_client(settings: Settings, client_id: str) -> mqtt.Client:
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


class NotConnectedFilter(logging.Filter):
    """Drops paho's "Client is not connected" error.

    paho's network loop logs it once after every lost connection and after our own
    disconnect() (the socket is closed between two loop iterations). It says nothing about
    delivery (the outbox holds what was not acknowledged, and our own lines say what
    happened), and an ERROR line on every clean shutdown or every 30 s of a silent broker
    would teach operators to ignore ERROR lines. On paho's logger while a Publisher runs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


def stop_client(client: mqtt.Client, timeout: float) -> None:
    """Disconnect and end paho's network thread, waiting at most ``timeout`` seconds; then
    close the client's sockets."""
    client.disconnect()
    # loop_stop() joins without a timeout; paho's thread may sit in a connect attempt or
    # a reconnect back-off. Bound the wait; the thread is a daemon either way.
    stopper = threading.Thread(target=client.loop_stop, name="mqtt-stop", daemon=True)
    stopper.start()
    stopper.join(timeout)
    if stopper.is_alive():
        logger.warning("paho's network thread did not end in time; leaving it behind")
        return
    close_sockets(client)


def close_sockets(client: mqtt.Client) -> None:
    """Close the sockets of a client whose network loop has ended.

    paho has no close(): the socket pair its loop uses to wake itself stays open until its
    finaliser runs at garbage collection, and a client that is part of a reference cycle
    (its callbacks are our bound methods) can have its sockets collected first: a
    ResourceWarning "unclosed socket" at some later, unrelated moment. The finaliser is
    public and closes them now (running it again at collection finds nothing to close)."""
    client.__del__()


def describe(base: str, message: OutboxMessage) -> str:
    """'study result <uid> (alert <id>, outbox #n)' — never payload contents; the topic's
    text escaped (it may be what broke delivery)."""
    rest = message.topic.removeprefix(f"{base}/")
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
