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
refreshes the retained status. What both threads update is the in-flight bookkeeping
(``flight.py``) and the strikes (``strikes.py``), each behind its own lock, which no thread
holds while calling into paho, so the lock order is never inverted. Callbacks of a replaced
client are ignored.

Modules: ``client.py`` (the paho client: credentials, TLS, topic rules, stopping it),
``connection.py`` (the client in use, its connection callbacks, its replacement),
``flight.py`` (rows and packet ids in flight), ``strikes.py`` (which row broke delivery),
``delivery.py`` (what becomes of each row), ``acks.py`` (dashboards' acks),
``publisher.py`` (:class:`Publisher`: the drain thread, the retained status) and
``check.py`` (``edge-agent check``'s one connect attempt).

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

from ..store import OutboxMessage
from .acks import Ack
from .check import check_broker
from .client import MAX_IN_FLIGHT, silent_broker, topic_problem
from .outbox import Outbox
from .publisher import Publisher

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
