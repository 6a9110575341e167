"""``edge-agent check``'s broker check: one connect attempt."""

from __future__ import annotations

import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from ..config import Settings
from ..errors import BrokerUnreachable
from .client import default_client_id, new_client, silent_broker


def check_broker(settings: Settings, timeout: float = 5.0) -> None:
    """One connect attempt, as ``edge-agent check`` does; raises BrokerUnreachable.

    Uses its own client id (``…-check``) and a clean session so that it never takes over
    the session of a running agent.
    """
    host, port = settings.mqtt.host, settings.mqtt.port
    where = f"MQTT broker {host}:{port}"
    client = new_client(settings, f"{default_client_id(settings)}-check")
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
