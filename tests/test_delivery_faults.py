"""Faults found from outside, against the daemon as its own process and a real Mosquitto:
a message the broker will not take never blocks the others, an outbox that does not move
makes the agent NOT HEALTHY, a broker that never answers CONNECT is named, and what
arrives on the ack topic is data.

Results are committed into the daemon's state database the way the scoring thread does
(:class:`test_delivery.Injector`); a fault "whatever its cause" is made by changing the
committed outbox row, as a bug upstream would have left it.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.brokers import Mosquitto, SilentListener, Subscriber
from helpers.daemon import Daemon
from helpers.delivery import BASE, UID, Injector, delivered, start, write_config
from helpers.polling import wait_until
from helpers.systemd import FakeSystemd, supervise

from edge_agent.store import Store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        d.kill()


def status_messages(sub: Subscriber) -> list[dict]:
    return [m.json() for m in sub.messages if m.topic == f"{BASE}/status"]


def latest_status(sub: Subscriber, timeout: float = 10, **expected: object) -> dict:
    """The latest status message (from now on or retained) with the ``expected`` values."""
    found: list[dict] = []

    def seen() -> bool:
        found[:] = [
            s for s in status_messages(sub) if all(s.get(k) == v for k, v in expected.items())
        ]
        return bool(found)

    wait_until(seen, timeout, f"a status with {expected}")
    return found[-1]


def agent_status(tmp: Path) -> str:
    """``edge-agent status`` for the daemon's config, as a person at the box runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "status", "--config", str(tmp / "agent.toml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def scrape(database: Path) -> str:
    from prometheus_client import generate_latest

    from edge_agent.metrics import registry_for

    return generate_latest(registry_for(database)).decode()


def poison(database: Path, alert: str, **columns: object) -> None:
    """Change a committed outbox row (topic or payload), as a bug upstream could have."""
    db = sqlite3.connect(database)
    with db:
        for column, value in columns.items():
            db.execute(f"UPDATE outbox SET {column} = ? WHERE alert_id = ?", (value, alert))
    db.close()


# -- 1. one message never blocks the others ------------------------------------------------


@pytest.mark.slow
def test_a_result_whose_topic_holds_a_control_character_does_not_block_the_others(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Measured before: Mosquitto drops the connection on that PUBLISH, paho sends it again
    after every reconnect, 0 of 5 results delivered, also after a restart. Now the row is
    set aside before it reaches paho (kept, counted, shown), the other 4 arrive."""
    broker = Mosquitto(tmp_path / "broker").start()
    dashboard = Subscriber(broker, f"{BASE}/#", persistent=True)
    try:
        config = write_config(tmp_path, broker, quiet=86400)
        database = tmp_path / "state" / "state.sqlite3"
        inject = Injector(Store(database))
        results = [inject.result(f"{UID}.{n}", "urgent" if n == 2 else "routine") for n in range(5)]
        bad = results[2]
        poison(database, bad.alert_id, topic=f"{BASE}/study/{UID}.2\x0b")
        daemon = Daemon(config, tmp_path / "agent.log")
        daemons.append(daemon)
        start(daemon, dashboard)

        good = {r.alert_id for r in results} - {bad.alert_id}
        wait_until(lambda: set(delivered(dashboard)) == good, 15, "the 4 good results")
        status = latest_status(dashboard, outbox_set_aside=1, outbox_depth=1)
        assert "control character" in status["mqtt_last_error"]
        assert inject.store.outbox_set_aside_messages()[0].topic.endswith("\x0b")

        daemon.signal(15)
        assert daemon.wait(20) == 0
        text = agent_status(tmp_path)
        assert "set aside  1 message(s)" in text
        assert f"study/{UID}.2\\x0b: topic holds a control character" in text
        assert "\x0b" not in text
        assert "edge_triage_outbox_set_aside_messages 1.0" in scrape(database)

        # Restarted: the set-aside row is tried again at start, set aside again (one line),
        # counted once; a new result still flows.
        start(daemon, dashboard)
        later = inject.result(f"{UID}.9")
        wait_until(lambda: later.alert_id in delivered(dashboard), 15, "a result after restart")
        wait_until(lambda: "set aside again" in daemon.log.read_text(), 10, "the retry at start")
        log = daemon.log.read_text()
        assert log.count(f"set aside study result {UID}.2\\x0b (alert {bad.alert_id}") == 1
        assert "Traceback" not in log and "\x0b" not in log
        assert inject.store.counters()["outbox_set_aside"] == 1
        assert "lost the MQTT broker" not in log  # it never reached the broker
        inject.store.close()
    finally:
        dashboard.close()
        broker.stop()


@pytest.mark.slow
def test_a_message_that_breaks_the_connection_is_set_aside_after_max_attempts(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Whatever the cause: here the broker drops the connection on a packet above its
    max_packet_size. The row is sent alone after the first break; each break while it is
    alone is a strike; after mqtt.max_attempts it is set aside and the others flow."""
    broker = Mosquitto(tmp_path / "broker", extra_config="max_packet_size 4096\n").start()
    dashboard = Subscriber(broker, f"{BASE}/#", persistent=True)
    try:
        config = write_config(tmp_path, broker, quiet=86400, max_attempts=3)
        database = tmp_path / "state" / "state.sqlite3"
        inject = Injector(Store(database))
        results = [inject.result(f"{UID}.{n}") for n in range(5)]
        bad = results[1]
        body = json.loads(inject.sent[bad.alert_id])
        body["padding"] = "x" * 6000
        poison(database, bad.alert_id, payload=json.dumps(body).encode())
        daemon = Daemon(config, tmp_path / "agent.log")
        daemons.append(daemon)
        start(daemon, dashboard)

        good = {r.alert_id for r in results} - {bad.alert_id}
        wait_until(lambda: set(delivered(dashboard)) == good, 30, "the 4 good results")
        latest_status(dashboard, outbox_set_aside=1, outbox_depth=1, outbox_on_probation=0)
        log = daemon.log.read_text()
        assert "were in flight when the connection broke" in log
        assert f"set aside study result {UID}.1 (alert {bad.alert_id}" in log
        assert "closed the connection each of the 3 times it was sent alone" in log
        assert "has died" not in log and "Traceback" not in log and "NOT HEALTHY" not in log
        drops = broker.log_text().count("disconnected due to oversize packet")
        assert 3 <= drops <= 4, drops  # once with the others, then 3 times alone
        inject.store.close()
    finally:
        dashboard.close()
        broker.stop()


# -- 2. an outbox that does not move -------------------------------------------------------


@pytest.mark.slow
def test_an_outbox_that_does_not_move_while_the_broker_is_there_makes_the_agent_unhealthy(
    tmp_path: Path, daemons: list[Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker holds every PUBACK (SIGSTOP, TCP stays up): NOT HEALTHY with the reason in
    the log and in systemd's STATUS=, no watchdog ping; healthy again once it moves."""
    broker = Mosquitto(tmp_path / "broker").start()
    dashboard = Subscriber(broker, f"{BASE}/#", persistent=True)
    systemd = FakeSystemd(tmp_path / "notify.socket")
    supervise(monkeypatch, systemd)
    try:
        config = write_config(
            tmp_path, broker, quiet=86400, stalled_after_seconds=2, keepalive_seconds=120
        )
        daemon = Daemon(config, tmp_path / "agent.log")
        daemons.append(daemon)
        start(daemon, dashboard)
        inject = Injector(Store(tmp_path / "state" / "state.sqlite3"))
        time.sleep(3)  # an empty outbox that does not move is not stuck
        assert "NOT HEALTHY" not in daemon.log.read_text().upper()

        broker.pause()  # TCP stays up, no PUBACK comes
        result = inject.result(f"{UID}.1")
        wait_until(lambda: "not healthy: the outbox has not moved" in daemon.log.read_text(), 10)
        (unhealthy_at, status) = next(
            (at, s) for at, s in systemd.fields("STATUS") if s.startswith("NOT HEALTHY")
        )
        assert "the outbox has not moved for over 2 s" in status
        time.sleep(2.5)
        pings = [at for at, _ in systemd.fields("WATCHDOG")]
        assert not [at for at in pings if at > unhealthy_at + 0.5]  # no pings while stuck
        broker.resume()
        wait_until(lambda: result.alert_id in delivered(dashboard), 10, "the result")
        wait_until(lambda: "healthy again" in daemon.log.read_text(), 5, "healthy again")
        log = daemon.log.read_text()
        assert log.count("not healthy: the outbox has not moved for over 2 s") == 1
        assert f"MQTT broker {broker.host}:{broker.port} accepts the connection" in log
        wait_until(lambda: systemd.fields("WATCHDOG")[-1][0] > time.monotonic() - 2, 5)
        inject.store.close()
    finally:
        dashboard.close()
        broker.stop()
        systemd.close()


# -- 3. a broker that accepts TCP and never answers CONNECT --------------------------------


@pytest.mark.slow
def test_a_broker_that_never_answers_connect_is_named_once_in_log_and_status(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    silent = SilentListener()
    try:
        fake = Mosquitto.__new__(Mosquitto)  # write_config only reads host and port
        fake.host, fake.port = "127.0.0.1", silent.port
        config = write_config(tmp_path, fake, quiet=86400, keepalive_seconds=5)
        daemon = Daemon(config, tmp_path / "agent.log")
        daemons.append(daemon)
        daemon.start()
        words = f"MQTT broker 127.0.0.1:{silent.port} accepts connections but did not answer"
        wait_until(lambda: words in daemon.log.read_text(), 20, "the silent broker named")
        wait_until(lambda: len(silent.accepted) >= 3, 30, "two more connect attempts")
        log = daemon.log.read_text()
        assert log.count(words) == 1  # once, then quiet
        assert "Client is not connected" not in log
        wait_until(lambda: words in agent_status(tmp_path), 10, "edge-agent status to say it")
        assert daemon.alive()
    finally:
        silent.close()


# -- 4. ack payloads are data --------------------------------------------------------------


@pytest.mark.slow
def test_ack_payloads_are_data(tmp_path: Path, daemons: list[Daemon]) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    dashboard = Subscriber(broker, f"{BASE}/#", persistent=True)
    try:
        daemon = Daemon(write_config(tmp_path, broker, quiet=86400), tmp_path / "agent.log")
        daemons.append(daemon)
        start(daemon, dashboard)
        inject = Injector(Store(tmp_path / "state" / "state.sqlite3"))
        urgent = inject.result(f"{UID}.1", "urgent")
        wait_until(lambda: urgent.alert_id in delivered(dashboard), 10, "the urgent result")
        ack_topic = f"{BASE}/ack/{UID}.1"
        forged = "2026-12-06 10:00:00 ERROR edge_agent forged line"
        bad = [
            json.dumps({"alert_id": f"{urgent.alert_id}\n{forged}"}),  # forges a log line
            json.dumps({"alert_id": "\x1b[2J\x1b[31mred"}),  # ANSI escapes
            json.dumps({"alert_id": "a" * 5_000_000}),  # 5 MB
            "[" * 100_000,  # deep JSON
        ]
        for payload in bad:
            dashboard.publish(ack_topic, payload)
        for n in range(300):  # a flood of acks for alerts this agent never had
            dashboard.publish(ack_topic, json.dumps({"alert_id": f"{n:032x}"}))
        real = {"alert_id": urgent.alert_id, "by": "dr-\x1b[31mred\nx", "at": "2026-12-06T10:00Z"}
        dashboard.publish(ack_topic, json.dumps(real))
        wait_until(lambda: f"alert {urgent.alert_id}: acknowledged" in daemon.log.read_text())

        log = daemon.log.read_text()
        assert not any(line.startswith(forged) for line in log.splitlines())
        assert "\x1b" not in log and "RecursionError" not in log and "Traceback" not in log
        assert len(log) < 20_000, len(log)  # the 5 MB value is not logged
        ack_lines = [
            line for line in log.splitlines() if "edge_agent.mqtt" in line and "ack" in line
        ]
        assert len(ack_lines) <= 3, ack_lines  # one warning, one real ack (+ a summary)
        latest_status(dashboard, acks_unknown=300, acks_refused=4, acks_received=1, acknowledged=1)
        alert = inject.store.alert(urgent.alert_id)
        assert alert is not None and alert["acked_by"] == "dr-\\x1b[31mred\\nx"
        text = agent_status(tmp_path)
        assert "acks       1 received, 300 for no urgent alert" in text and "4 malformed" in text
        inject.store.close()
    finally:
        dashboard.close()
        broker.stop()
