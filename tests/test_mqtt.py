"""edge_agent.mqtt against a real Mosquitto (tests/helpers/brokers.py)."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.brokers import Mosquitto, SilentListener, Subscriber, free_port
from helpers.polling import wait_until

from edge_agent.config import Settings
from edge_agent.errors import BrokerUnreachable, ConfigError
from edge_agent.mqtt import (
    MAX_IN_FLIGHT,
    Ack,
    OutboxMessage,
    Publisher,
    check_broker,
    silent_broker,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
SITE, DEVICE = "site1", "box7"
P = f"edge-triage/v1/{SITE}/{DEVICE}"
SECRET = "DO-NOT-LOG-ME"  # put into every payload; must never reach a log record
ALERT = "0123456789abcdef" * 2  # the shape of results.alert_id


class SqliteOutbox:
    """A tiny thread-safe outbox with the store's interface, plus test hooks."""

    def __init__(self) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, qos INTEGER NOT NULL, set_aside TEXT)"
        )
        self._lock = threading.Lock()
        self.deleted: list[int] = []
        self.limits: list[int] = []
        self.fail_deletes = 0  # the next n outbox_delete calls raise

    def add(self, uid: str, alert_id: str | None = None, kind: str = "study") -> int:
        topic = f"{P}/study/{uid}" if kind == "study" else f"{P}/{kind}"
        body = {"alert_id": alert_id or f"alert-{uid}", "study_instance_uid": uid, "note": SECRET}
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO outbox (topic, payload, qos) VALUES (?, ?, 1)",
                (topic, json.dumps(body).encode()),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def outbox_pending(self, limit: int, exclude: Collection[int]) -> list[OutboxMessage]:
        with self._lock:
            self.limits.append(limit)
            rows = self._db.execute(
                "SELECT id, topic, payload, qos FROM outbox WHERE set_aside IS NULL ORDER BY id"
            )
            out = [OutboxMessage(*r) for r in rows if r[0] not in exclude]
            return out[:limit]

    def outbox_set_aside(self, message_id: int, reason: str) -> bool:
        with self._lock:
            (before,) = self._db.execute(
                "SELECT set_aside FROM outbox WHERE id = ?", (message_id,)
            ).fetchone()
            self._db.execute("UPDATE outbox SET set_aside = ? WHERE id = ?", (reason, message_id))
            return before is None

    def outbox_set_aside_messages(self) -> list[OutboxMessage]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos FROM outbox WHERE set_aside IS NOT NULL"
            )
            return [OutboxMessage(*r) for r in rows]

    def set_aside(self) -> dict[int, str]:
        with self._lock:
            rows = self._db.execute("SELECT id, set_aside FROM outbox WHERE set_aside IS NOT NULL")
            return dict(rows.fetchall())

    def outbox_delete(self, message_id: int) -> None:
        with self._lock:
            if self.fail_deletes:
                self.fail_deletes -= 1
                raise sqlite3.OperationalError("database is locked (simulated)")
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))
            self.deleted.append(message_id)

    def outbox_depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def settings_for(host: str, port: int, **mqtt: Any) -> Settings:
    return Settings(site=SITE, device_id=DEVICE, mqtt={"host": host, "port": port, **mqtt})


def is_state(state: str) -> Callable[[Any], bool]:
    return lambda m: m.topic == f"{P}/status" and m.json()["state"] == state


@pytest.fixture
def outbox() -> Iterator[SqliteOutbox]:
    box = SqliteOutbox()
    yield box
    box.close()


@pytest.fixture
def make_publisher(
    mosquitto: Mosquitto, outbox: SqliteOutbox
) -> Iterator[Callable[..., Publisher]]:
    """Build and start a Publisher on the test broker; stopped after the test."""
    made: list[Publisher] = []

    def make(
        *,
        broker: Mosquitto | None = None,
        port: int | None = None,
        connect: bool = True,
        mqtt: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Publisher:
        b = broker or mosquitto
        settings = settings_for(b.host, port or b.port, **(mqtt or {}))
        kwargs.setdefault("status", lambda: {"studies": 3, "outbox": outbox.outbox_depth()})
        pub = Publisher(settings, kwargs.pop("outbox", outbox), **kwargs)
        made.append(pub)
        pub.start()
        if connect:
            assert pub.wait_connected(5), "publisher did not connect"
        return pub

    yield make
    for pub in made:
        pub.stop(timeout=1.0)


# -- status and Will -----------------------------------------------------------------------


def test_online_status_retained_on_connect(make_publisher, subscriber) -> None:
    pub = make_publisher()
    assert pub.connected and pub.healthy()
    subscriber(f"{P}/status").wait_for(is_state("online"))  # live or retained
    # Subscribing after the broker has it: only a retained message can arrive.
    (status,) = subscriber(f"{P}/status").wait_for(is_state("online"))
    assert status.retain
    assert status.content_type == "application/json"
    body = status.json()
    assert body["studies"] == 3 and body["outbox"] == 0
    assert body["at"].endswith("+00:00")
    sub = subscriber(f"{P}/#")
    sub.wait_for(is_state("online"))  # the retained one
    pub.publish_status()
    sub.wait_for(lambda m: is_state("online")(m) and not m.retain)


def test_status_refreshed_every_interval(make_publisher, subscriber) -> None:
    sub = subscriber(f"{P}/status")
    make_publisher(mqtt={"status_interval_seconds": 0.2})
    messages = sub.wait_for(is_state("online"), count=3, timeout=4)
    assert len({m.json()["at"] for m in messages}) == len(messages)


def test_will_offline_when_process_is_killed(mosquitto, subscriber) -> None:
    """The honest way to kill the socket: SIGKILL a process running the publisher."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from edge_agent.config import Settings
        from edge_agent.mqtt import Publisher

        class Empty:
            def outbox_pending(self, limit, exclude): return []
            def outbox_delete(self, message_id): pass
            def outbox_depth(self): return 0

        settings = Settings(site={SITE!r}, device_id={DEVICE!r},
                            mqtt={{"host": {mosquitto.host!r}, "port": {mosquitto.port}}})
        pub = Publisher(settings, Empty(), status=lambda: {{}})
        pub.start()
        if not pub.wait_connected(5):
            sys.exit(3)
        print("connected", flush=True)
        time.sleep(60)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["PYTHONPATH"] = str(ROOT)
    sub = subscriber(f"{P}/status")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        sub.wait_for(is_state("online"))
        proc.kill()
        proc.wait(5)
        (offline,) = sub.wait_for(is_state("offline"), timeout=5)
        assert offline.content_type == "application/json"
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # and it is the retained state for whoever looks later
    (later,) = subscriber(f"{P}/status").wait_for(is_state("offline"))
    assert later.retain


def test_stop_publishes_stopped_retained_and_no_will(make_publisher, subscriber) -> None:
    sub = subscriber(f"{P}/status")
    pub = make_publisher()
    sub.wait_for(is_state("online"))
    started = time.monotonic()
    pub.stop(timeout=2.0)
    assert time.monotonic() - started < 1.0
    assert not pub.connected and not pub.healthy()
    sub.wait_for(is_state("stopped"))
    time.sleep(0.3)  # a Will would follow the disconnect at once
    assert [m.json()["state"] for m in sub.messages] == ["online", "stopped"]
    (retained,) = subscriber(f"{P}/status").wait_for(is_state("stopped"))
    assert retained.retain


# -- outbox delivery -----------------------------------------------------------------------


def test_outbox_rows_delivered_once_each_with_json_content_type(
    make_publisher, subscriber, outbox
) -> None:
    sub = subscriber(f"{P}/study/+")
    before = [outbox.add(f"1.2.{i}") for i in range(5)]
    pub = make_publisher()
    after = [outbox.add(f"1.3.{i}") for i in range(3)]
    pub.wake()
    got = sub.wait_for(count=8)
    wait_until(lambda: outbox.outbox_depth() == 0, what="outbox drained")
    time.sleep(0.2)  # nothing more arrives
    got = sub.messages
    assert sorted(m.json()["alert_id"] for m in got) == sorted(
        [f"alert-1.2.{i}" for i in range(5)] + [f"alert-1.3.{i}" for i in range(3)]
    )
    assert all(m.content_type == "application/json" and not m.retain for m in got)
    assert [m.topic for m in got[:5]] == [f"{P}/study/1.2.{i}" for i in range(5)]  # oldest first
    assert sorted(outbox.deleted) == before + after
    assert pub.in_flight == 0


def test_rows_deleted_only_after_puback(make_publisher, subscriber, outbox, mosquitto) -> None:
    sub = subscriber(f"{P}/study/+")
    pub = make_publisher()
    mosquitto.pause()  # TCP stays up, no PUBACK comes back
    try:
        ids = [outbox.add(f"1.4.{i}") for i in range(3)]
        pub.wake()
        wait_until(lambda: pub.in_flight == 3, what="3 rows handed to the broker")
        time.sleep(0.3)
        assert outbox.deleted == [] and outbox.outbox_depth() == 3
    finally:
        mosquitto.resume()
    sub.wait_for(count=3)
    wait_until(lambda: outbox.outbox_depth() == 0, what="rows deleted after PUBACK")
    assert sorted(outbox.deleted) == ids


def test_rows_added_while_broker_down_delivered_after_restart(
    make_publisher, subscriber, outbox, mosquitto
) -> None:
    sub = subscriber(f"{P}/study/+", persistent=True)
    pub = make_publisher()
    mosquitto.stop()
    wait_until(lambda: not pub.connected, what="publisher notices the broker is gone")
    ids = [outbox.add(f"1.5.{i}") for i in range(4)]
    pub.wake()
    time.sleep(0.3)
    assert outbox.outbox_depth() == 4 and outbox.deleted == []
    assert pub.healthy()
    mosquitto.start()  # same port, same persistence folder
    assert pub.wait_connected(8)
    got = sub.wait_for(count=4, timeout=8)
    assert sorted(m.json()["alert_id"] for m in got) == [f"alert-1.5.{i}" for i in range(4)]
    wait_until(lambda: outbox.outbox_depth() == 0, what="rows deleted after restart")
    assert sorted(outbox.deleted) == ids


def test_overdue_puback_is_published_again_and_deleted_once(
    make_publisher, subscriber, outbox, mosquitto
) -> None:
    sub = subscriber(f"{P}/study/+")
    pub = make_publisher(resend_after_seconds=0.3)
    mosquitto.pause()
    try:
        (row,) = [outbox.add("1.6.1")]
        pub.wake()
        time.sleep(1.0)  # ≥ 2 resends while no PUBACK comes back
    finally:
        mosquitto.resume()
    got = sub.wait_for(count=2)  # at least once: receivers dedup on alert_id
    assert {m.json()["alert_id"] for m in got} == {"alert-1.6.1"}
    wait_until(lambda: outbox.outbox_depth() == 0)
    time.sleep(0.3)  # late PUBACKs of the other copies are ignored
    assert outbox.deleted == [row]
    assert pub.in_flight == 0 and pub.healthy()


def test_batches_never_exceed_the_in_flight_cap(make_publisher, subscriber, outbox) -> None:
    sub = subscriber(f"{P}/study/+")
    for i in range(150):
        outbox.add(f"1.7.{i}")
    make_publisher()
    sub.wait_for(count=150, timeout=10)
    wait_until(lambda: outbox.outbox_depth() == 0)
    assert outbox.limits and max(outbox.limits) < MAX_IN_FLIGHT
    assert len(outbox.deleted) == 150


def test_broker_receive_maximum_is_respected(tmp_path, make_publisher, subscriber, outbox) -> None:
    """paho ignores the CONNACK's Receive Maximum; the publisher caps its batches by it."""
    with Mosquitto(tmp_path / "rm5", extra_config="max_inflight_messages 5\n") as broker:
        sub = subscriber(f"{P}/study/+", broker=broker)
        for i in range(40):
            outbox.add(f"1.14.{i}")
        pub = make_publisher(broker=broker)
        sub.wait_for(count=40, timeout=10)
        wait_until(lambda: outbox.outbox_depth() == 0)
        assert max(outbox.limits) <= 4  # one slot left for the status message
        pub.stop(timeout=1.0)


def test_refused_publish_kept_logged_once_and_retried(
    tmp_path, make_publisher, subscriber, outbox, caplog
) -> None:
    """PUBACK 0x87 (not authorized, from the broker's ACL) keeps the row; retried later."""
    deny = f"topic readwrite {P}/status\ntopic read {P}/ack/#\n"
    allow = f"topic readwrite {P}/#\n"
    with Mosquitto(tmp_path / "acl-broker", acl=deny) as broker:
        caplog.set_level(logging.DEBUG, logger="edge_agent.mqtt")
        pub = make_publisher(broker=broker, resend_after_seconds=0.2, mqtt={"max_attempts": 10})
        row = outbox.add("1.8.1")
        pub.wake()
        time.sleep(1.0)  # refused at 0 s, retried after 0.2 s and 0.6 s
        assert outbox.outbox_depth() == 1 and outbox.deleted == []
        assert pub.healthy() and pub.in_flight == 0
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "Not authorized" in errors[0].getMessage()
        assert "1.8.1" in errors[0].getMessage() and "alert-1.8.1" in errors[0].getMessage()
        assert broker.log_text().count("Denied PUBLISH") >= 2

        sub = subscriber(f"{P}/study/+", broker=broker)
        broker.reload(acl=allow)
        sub.wait_for(timeout=5)  # next retry after 0.8 s back-off
        wait_until(lambda: outbox.deleted == [row])
        pub.stop(timeout=1.0)


def test_refused_rows_are_set_aside_after_max_attempts_the_rest_flows_and_retried_later(
    tmp_path, make_publisher, subscriber, outbox, caplog
) -> None:
    """PUBACK 0x87 for one study's topic: set aside after mqtt.max_attempts refusals; the
    other rows are delivered meanwhile; tried again after set_aside_retry_seconds."""
    deny = f"topic readwrite {P}/status\ntopic read {P}/ack/#\ntopic readwrite {P}/study/1.20.2\n"
    allow = f"topic readwrite {P}/#\n"
    with Mosquitto(tmp_path / "acl-broker", acl=deny) as broker:
        caplog.set_level(logging.INFO, logger="edge_agent.mqtt")
        sub = subscriber(f"{P}/study/+", broker=broker)
        refused = outbox.add("1.20.1")
        pub = make_publisher(
            broker=broker,
            resend_after_seconds=0.1,
            mqtt={"max_attempts": 2, "set_aside_retry_seconds": 2},
        )
        wait_until(lambda: refused in outbox.set_aside(), what="the refused row set aside")
        assert "refused it 2 times: Not authorized (0x87)" in outbox.set_aside()[refused]
        ok = outbox.add("1.20.2")
        pub.wake()
        sub.wait_for(lambda m: m.topic.endswith("1.20.2"))
        wait_until(lambda: outbox.deleted == [ok], what="the other row delivered")
        assert pub.healthy() and outbox.outbox_depth() == 1

        broker.reload(acl=allow)
        sub.wait_for(lambda m: m.topic.endswith("1.20.1"), timeout=5)  # the retry
        wait_until(lambda: outbox.deleted == [ok, refused], what="the set-aside row delivered")
        assert outbox.set_aside() == {}
        lines = [r.getMessage() for r in caplog.records if "1.20.1" in r.getMessage()]
        assert sum(line.startswith("set aside study result 1.20.1") for line in lines) == 1
        pub.stop(timeout=1.0)


def test_an_outage_with_rows_in_flight_sets_nothing_aside(
    make_publisher, subscriber, outbox, mosquitto, caplog
) -> None:
    """The broker dies with 10 rows unacknowledged: the connection break is nobody's fault;
    even with max_attempts 1 the rows are sent again one at a time and all delivered."""
    caplog.set_level(logging.INFO, logger="edge_agent.mqtt")
    pub = make_publisher(mqtt={"max_attempts": 1})
    first_client = pub._client
    mosquitto.pause()
    rows = [outbox.add(f"1.21.{i}") for i in range(10)]
    pub.wake()
    wait_until(lambda: pub.in_flight == 10, what="10 rows in flight")
    # SIGKILL while it is still stopped (kill() would SIGCONT it first, and it might send
    # its PUBACKs in between): a crash with every row unacknowledged.
    assert mosquitto._proc is not None
    os.kill(mosquitto._proc.pid, signal.SIGKILL)
    mosquitto.kill()  # reaps it
    mosquitto.start()
    wait_until(lambda: sorted(outbox.deleted) == rows, 15, "every row delivered")
    assert outbox.set_aside() == {}
    assert pub._client is not first_client  # paho's copies went with the old client
    assert any(
        "10 outbox messages were in flight when the connection broke" in r.getMessage()
        for r in caplog.records
    )
    assert pub.healthy() and pub.counters()["outbox_on_probation"] == 0


def test_a_topic_the_broker_could_never_take_is_set_aside_before_paho(
    make_publisher, subscriber, outbox, mosquitto
) -> None:
    sub = subscriber(f"{P}/study/+")
    pub = make_publisher()
    bad = [outbox.add(uid) for uid in ("1.22.1\n", "1.22.+", "1.22.\x00", "1.22.\x1b[2J")]
    good = outbox.add("1.22.2")
    pub.wake()
    sub.wait_for(lambda m: m.topic.endswith("1.22.2"))
    wait_until(lambda: outbox.deleted == [good])
    assert sorted(outbox.set_aside()) == bad
    assert pub.connected  # never sent: the broker had no reason to drop the connection
    assert mosquitto.log_text().count(f"as edge-agent-{SITE}-{DEVICE} ") == 1


# -- acks ----------------------------------------------------------------------------------


def test_ack_reaches_on_ack(make_publisher, subscriber) -> None:
    acks: list[Ack] = []
    pub = make_publisher(on_ack=acks.append)
    assert pub.wait_acks_subscribed(5)
    dashboard = subscriber(f"{P}/#")
    ack = {"alert_id": ALERT, "by": "dashboard-3", "at": "2025-01-01T00:00:00Z"}
    dashboard.publish(f"{P}/ack/1.2.840.99", json.dumps(ack))
    wait_until(lambda: len(acks) == 1, what="on_ack")
    assert acks == [Ack("1.2.840.99", ALERT, "dashboard-3", "2025-01-01T00:00:00Z")]
    assert pub.acks.counters()["acks_received"] == 1


def test_malformed_ack_is_ignored_and_publisher_stays_healthy(
    make_publisher, subscriber, outbox, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent.mqtt")
    acks: list[str] = []
    boom, good = "b0" * 16, "90" * 16

    def on_ack(ack: Ack) -> None:
        acks.append(ack.alert_id)
        if ack.alert_id == boom:
            raise RuntimeError("on_ack broke")

    pub = make_publisher(on_ack=on_ack)
    assert pub.wait_acks_subscribed(5)  # else the first bad ack may reach no subscriber
    dashboard = subscriber(f"{P}/study/+")
    for bad in (b"{not json " + SECRET.encode(), b"\xff\xfe", b'["a"]', b'{"by": "x"}', b""):
        dashboard.publish(f"{P}/ack/1.9.1", bad)
    dashboard.publish(f"{P}/ack/1.9.1", json.dumps({"alert_id": boom}))
    dashboard.publish(f"{P}/ack/1.9.1", json.dumps({"alert_id": good}))
    wait_until(lambda: acks == [boom, good], what="the two good acks")
    assert pub.healthy()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # the first bad one is logged, the next ones within a minute only counted
    assert sum("ignoring an ack on study 1.9.1: not JSON" in w for w in warnings) == 1
    assert len(warnings) == 1
    assert pub.acks.counters()["acks_refused"] == 5
    assert any(r.exc_info for r in caplog.records if "1.9.1" in r.getMessage())
    # still delivering
    outbox.add("1.9.2")
    pub.wake()
    dashboard.wait_for()
    assert all(SECRET not in r.getMessage() for r in caplog.records)


# -- failures inside our code and the store ------------------------------------------------


def test_exception_in_outbox_delete_does_not_kill_the_loop(
    make_publisher, subscriber, outbox, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    sub = subscriber(f"{P}/study/+")
    outbox.fail_deletes = 1
    pub = make_publisher()
    first = outbox.add("1.10.1")
    pub.wake()
    sub.wait_for(lambda m: m.json()["alert_id"] == "alert-1.10.1")
    wait_until(lambda: outbox.deleted == [first], what="the row sent again and deleted")
    assert pub.healthy()
    second = outbox.add("1.10.2")
    pub.wake()
    sub.wait_for(lambda m: m.json()["alert_id"] == "alert-1.10.2")
    wait_until(lambda: outbox.deleted == [first, second])
    assert pub.healthy()
    (failure,) = [r for r in caplog.records if r.exc_info]
    assert "could not delete delivered study result 1.10.1" in failure.getMessage()
    assert all(SECRET not in r.getMessage() for r in caplog.records)  # paho's debug log too


def test_healthy_is_false_when_the_loop_thread_dies(make_publisher) -> None:
    pub = make_publisher()
    assert pub.healthy()
    pub._client.loop_stop()  # what an uncaught exception inside paho would leave behind
    assert not pub.healthy()


# -- broker down ---------------------------------------------------------------------------


def test_start_does_not_block_and_connects_when_the_broker_appears(
    tmp_path, make_publisher, subscriber, outbox
) -> None:
    port = free_port()
    outbox.add("1.11.1")
    started = time.monotonic()
    pub = make_publisher(port=port, connect=False)
    assert time.monotonic() - started < 0.5
    assert not pub.wait_connected(0.5) and pub.healthy()
    with Mosquitto(tmp_path / "late", port=port) as broker:
        assert pub.wait_connected(5)  # first retry after 1 s, then 2 s
        sub = subscriber(f"{P}/status", broker=broker)
        sub.wait_for(is_state("online"))
        wait_until(lambda: outbox.outbox_depth() == 0)
        pub.stop(timeout=1.0)


def test_stop_returns_within_timeout_when_broker_is_down(make_publisher, outbox, mosquitto) -> None:
    pub = make_publisher()
    mosquitto.stop()
    wait_until(lambda: not pub.connected)
    outbox.add("1.12.1")
    pub.wake()
    started = time.monotonic()
    pub.stop(timeout=1.0)
    assert time.monotonic() - started < 2.0
    assert outbox.outbox_depth() == 1  # kept for the next run


def test_stop_returns_within_timeout_when_never_connected(make_publisher, outbox) -> None:
    pub = make_publisher(port=free_port(), connect=False)
    time.sleep(0.2)
    started = time.monotonic()
    pub.stop(timeout=1.0)
    assert time.monotonic() - started < 2.0


def test_stop_waits_for_in_flight_pubacks(make_publisher, subscriber, outbox, mosquitto) -> None:
    pub = make_publisher()
    mosquitto.pause()
    outbox.add("1.13.1")
    pub.wake()
    wait_until(lambda: pub.in_flight == 1)
    threading.Timer(0.3, mosquitto.resume).start()
    pub.stop(timeout=3.0)
    assert outbox.outbox_depth() == 0  # acknowledged during stop, not left for the next run


def open_sockets() -> set[str]:
    """This process's open sockets, as /proc names them (socket:[inode])."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own fd)
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def test_stop_leaves_no_socket_of_the_client_open(make_publisher, outbox, mosquitto) -> None:
    """paho's socket pair (its loop's wake-up) is closed at stop and with a replaced client,
    not left to garbage collection: there, a client in a reference cycle can lose its
    sockets first, an "unclosed socket" warning at some later test (filterwarnings=error).
    The garbage collector is held off so that only stop() can have closed them."""
    gc.collect()
    gc.disable()
    try:
        before = open_sockets()
        pub = make_publisher(mqtt={"max_attempts": 1})
        outbox.add("1.31.1")
        outbox.add("1.31.2")
        mosquitto.pause()
        pub.wake()
        wait_until(lambda: pub.in_flight == 2, what="2 rows in flight")
        first_client = pub._client
        # The connection breaks with both rows unacknowledged: the client is replaced.
        assert mosquitto._proc is not None
        os.kill(mosquitto._proc.pid, signal.SIGKILL)
        mosquitto.kill()  # reaps it
        mosquitto.start()
        wait_until(lambda: outbox.outbox_depth() == 0, 15, "every row delivered")
        assert pub._client is not first_client
        pub.stop(timeout=2.0)
        assert open_sockets() - before == set()
    finally:
        gc.enable()


# -- check_broker --------------------------------------------------------------------------


def test_check_broker_ok(mosquitto) -> None:
    check_broker(settings_for(mosquitto.host, mosquitto.port), timeout=2.0)


def test_check_broker_closed_port_raises_broker_unreachable() -> None:
    port = free_port()
    with pytest.raises(BrokerUnreachable, match=rf"127\.0\.0\.1:{port}.*[Rr]efused") as info:
        check_broker(settings_for("127.0.0.1", port), timeout=1.0)
    assert info.value.exit_code == 3


def test_check_broker_refused_connect_names_the_reason(tmp_path) -> None:
    with Mosquitto(tmp_path / "auth", extra_config="") as broker:
        broker.stop()
        conf = broker.conf_file.read_text().replace("allow_anonymous true", "allow_anonymous false")
        broker.conf_file.write_text(conf)
        broker.start()
        with pytest.raises(BrokerUnreachable, match=r"refused the connection: Not authorized"):
            check_broker(settings_for(broker.host, broker.port), timeout=2.0)


def test_check_broker_names_a_broker_that_never_answers_connect_as_the_daemon_does() -> None:
    silent = SilentListener()
    try:
        with pytest.raises(BrokerUnreachable) as info:
            check_broker(settings_for("127.0.0.1", silent.port), timeout=1.0)
        assert str(info.value) == silent_broker("127.0.0.1", silent.port, 1.0)
    finally:
        silent.close()


def test_tls_files_that_cannot_be_read_name_their_key(tmp_path) -> None:
    settings = settings_for("127.0.0.1", 8883, tls_ca=tmp_path / "missing-ca.pem")
    with pytest.raises(ConfigError) as info:
        Publisher(settings, SqliteOutbox(), status=dict)
    assert info.value.key == "mqtt.tls_ca"
    (tmp_path / "ca.pem").write_text("not a certificate")
    settings = settings_for("127.0.0.1", 8883, tls_ca=tmp_path / "ca.pem")
    with pytest.raises(ConfigError) as info:
        check_broker(settings)
    assert info.value.key == "mqtt.tls_ca"


def test_subscriber_helper_is_a_real_peer(subscriber) -> None:
    """Guard for the helper itself: it sees what another client publishes."""
    sub = subscriber("t/#")
    other: Subscriber = subscriber("unused/#")
    other.publish("t/x", b"1")
    (msg,) = sub.wait_for()
    assert (msg.topic, msg.payload, msg.retain) == ("t/x", b"1", False)


def test_clean_stops_log_no_paho_error(make_publisher, subscriber, caplog) -> None:
    # disconnect() races paho's network thread, which then logged "Client is not connected"
    # at ERROR on most clean stops: noise that teaches operators to ignore ERROR lines.
    caplog.set_level(logging.DEBUG, logger="edge_agent.mqtt.paho")
    sub = subscriber(f"{P}/status")
    for _ in range(5):
        pub = make_publisher()
        sub.wait_for(is_state("online"))
        pub.stop(timeout=2.0)
        sub.wait_for(is_state("stopped"))
        sub.messages.clear()
    errors = [r for r in caplog.records if r.name.endswith(".paho") and r.levelno >= logging.ERROR]
    assert errors == []
