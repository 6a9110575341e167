"""The board's MQTT side: every box's results, status and rejects in; acks out.

Subscriptions (``T = mqtt.topic_prefix``), QoS 1, in a persistent session (clean start off,
session expiry ``board.mqtt_session_expiry_hours``) so results published while the board is
down are delivered when it returns::

    T/+/+/study/+    results            → store, then the open pages
    T/+/+/status     retained status    → the boxes strip (offline is the box's Will)
    T/+/+/rejected   files a box refused
    T/+/+/ack/+      acks (this board's and other dashboards'), so every board agrees

The only topics the board publishes to are ``T/{site}/{device_id}/ack/{StudyInstanceUID}``,
built from a stored row (:meth:`BoardClient.publish_ack`), never from a request alone.
Everything received is checked (topic segments, UID, payload schema) and a bad message is
logged and dropped; it never stops the loop.
"""

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
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ..config import Settings
from ..dicom.uid import valid_uid
from ..identifiers import is_topic_segment
from ..mqtt.client import (
    CONTENT_TYPE,
    RECONNECT_MAX_SECONDS,
    RECONNECT_MIN_SECONDS,
    new_client,
)
from ..results import read_study_result
from .store import BoardStore
from .worklist import Ack

logger = logging.getLogger(__name__)

Notify = Callable[[str, dict[str, Any]], None]
"""Called with (event name, data) for each change the pages should see."""

MAX_PAYLOAD_BYTES = 256 * 1024
"""A result with a narrative is a few kB; anything far larger is not one (dropped)."""
ACK_PUBACK_SECONDS = 5.0


def uid_ok(text: str) -> bool:
    return valid_uid(text) == text


class BoardClient:
    def __init__(self, settings: Settings, store: BoardStore, notify: Notify) -> None:
        self._settings = settings
        self._store = store
        self._notify = notify
        self._prefix = settings.mqtt.topic_prefix
        self._filters = [
            f"{self._prefix}/+/+/study/+",
            f"{self._prefix}/+/+/status",
            f"{self._prefix}/+/+/rejected",
            f"{self._prefix}/+/+/ack/+",
        ]
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._stopping = False
        self.last_error: str | None = None
        client = new_client(settings, settings.board.client_id)
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.reconnect_delay_set(RECONNECT_MIN_SECONDS, RECONNECT_MAX_SECONDS)
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = int(self._settings.board.mqtt_session_expiry_hours * 3600)
        self._client.connect_async(
            self._settings.mqtt.host,
            self._settings.mqtt.port,
            keepalive=self._settings.mqtt.keepalive_seconds,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        logger.info(
            "board subscribing to %s/+/+/… on %s:%d",
            self._prefix,
            self._settings.mqtt.host,
            self._settings.mqtt.port,
        )

    def stop(self) -> None:
        # A clean disconnect keeps the session (its expiry is not 0): what is published
        # while the board is down waits at the broker.
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    # -- acks out ------------------------------------------------------------------------

    def publish_ack(self, row: dict[str, Any], ack: Ack) -> bool:
        """Publish ``ack`` for the stored ``row`` to its box's ack topic (QoS 1); True once
        the broker's PUBACK arrived. Site, device and UID come from the stored row and are
        checked again here: a row is the only source of an ack topic."""
        site, device, uid = row["site"], row["device_id"], row["study_instance_uid"]
        if not (is_topic_segment(site) and is_topic_segment(device) and uid_ok(uid)):
            raise ValueError("the stored row has no valid topic segments")
        if not self.connected:
            return False
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = CONTENT_TYPE
        body = {"alert_id": ack.alert_id, "by": ack.by, "at": ack.at}
        info = self._client.publish(
            f"{self._prefix}/{site}/{device}/ack/{uid}",
            json.dumps(body, separators=(",", ":")),
            qos=1,
            properties=props,
        )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        try:
            info.wait_for_publish(ACK_PUBACK_SECONDS)
        except RuntimeError:
            return False
        return info.is_published()

    # -- paho callbacks (network thread; each one catches everything) --------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, props: Any
    ) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            logger.error("MQTT broker refused the board's connection: %s", reason_code)
            return
        logger.info("board connected to MQTT (session present: %s)", flags.session_present)
        self.last_error = None
        self._connected.set()
        client.subscribe([(f, 1) for f in self._filters])
        self._notify("broker", {"connected": True})

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if self.last_error is None:
            logger.warning("cannot reach the MQTT broker; retrying with back-off")
        self.last_error = "cannot reach the broker"

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any
    ) -> None:
        if self._connected.is_set() and not self._stopping:
            logger.warning("board disconnected from MQTT: %s; reconnecting", reason_code)
        self._connected.clear()
        self._subscribed.clear()
        self._notify("broker", {"connected": False})

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, props: Any
    ) -> None:
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            logger.error("the broker refused a board subscription: %s", refused[0])
            self.last_error = f"subscription refused: {refused[0]}"
        else:
            self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self.handle(message.topic, bytes(message.payload))
        except Exception:
            logger.exception("error while handling a message on %s", message.topic)

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> None:
        """One received message: checked, stored, announced. Bad ones are logged, dropped."""
        now = time.time() if now is None else now
        parts = topic[len(self._prefix) + 1 :].split("/") if topic.startswith(self._prefix) else []
        if len(parts) < 3 or not (is_topic_segment(parts[0]) and is_topic_segment(parts[1])):
            logger.warning("ignoring a message on an unexpected topic")
            return
        site, device, kind = parts[0], parts[1], parts[2:]
        if len(payload) > MAX_PAYLOAD_BYTES:
            logger.warning("ignoring a %d-byte message from %s/%s", len(payload), site, device)
            return
        if kind == ["status"]:
            self._status(site, device, payload, now)
        elif kind == ["rejected"]:
            self._rejected(site, device, payload, now)
        elif len(kind) == 2 and kind[0] == "study" and uid_ok(kind[1]):
            self._result(site, device, kind[1], payload, now)
        elif len(kind) == 2 and kind[0] == "ack" and uid_ok(kind[1]):
            self._ack_seen(kind[1], payload)
        else:
            logger.warning("ignoring a message from %s/%s on an unexpected topic", site, device)

    def _result(self, site: str, device: str, uid: str, payload: bytes, now: float) -> None:
        try:
            result = read_study_result(payload)
        except ValueError as exc:
            logger.warning("ignoring a malformed result from %s/%s: %s", site, device, exc)
            return
        if result.study_instance_uid != uid:
            logger.warning(
                "ignoring a result from %s/%s whose UID is not its topic's", site, device
            )
            return
        row = self._store.add_result(site, device, result, payload, now)
        if row is not None:
            self._notify("study", row)

    def _status(self, site: str, device: str, payload: bytes, now: float) -> None:
        if not payload:  # the retained status was cleared: the box is gone
            self._notify("box", self._store.set_status(site, device, None, now))
            return
        status = _json_object(payload)
        if status is None:
            logger.warning("ignoring a malformed status from %s/%s", site, device)
            return
        self._notify("box", self._store.set_status(site, device, status, now))

    def _rejected(self, site: str, device: str, payload: bytes, now: float) -> None:
        rejected = _json_object(payload)
        if rejected is None:
            logger.warning("ignoring a malformed rejected-file message from %s/%s", site, device)
            return
        self._notify("rejected", self._store.add_rejected(site, device, rejected, now))

    def _ack_seen(self, uid: str, payload: bytes) -> None:
        """An ack on the wire (another dashboard's, or this board's own echo)."""
        ack = _json_object(payload)
        if ack is None:
            return
        alert, by, at = ack.get("alert_id"), ack.get("by"), ack.get("at")
        if not (isinstance(alert, str) and isinstance(by, str) and isinstance(at, str)):
            return
        row = self._store.acknowledge(uid, Ack(alert_id=alert, by=by[:64], at=at[:40]))
        if row is not None:
            self._notify("study", row)


def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
