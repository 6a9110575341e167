"""The rules under delivery, without a broker: which row broke the connection (strikes),
what an ack must look like, which topics can be published, escaping text from outside, and
the store's set-aside rows (schema 4)."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import pytest
from helpers.old_state import as_schema
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.mqtt import OutboxMessage, silent_broker, topic_problem
from edge_agent.mqtt.acks import (
    MAX_ACK_BYTES,
    MAX_BY_CHARS,
    Ack,
    AckLog,
    AckRefused,
    parse_ack,
)
from edge_agent.mqtt.strikes import Strikes
from edge_agent.results import alert_id
from edge_agent.store import SCHEMA_VERSION, Message, Store
from edge_agent.text import has_control, printable

UID = "1.2.826.0.1.3680043.10.77"
ALERT = alert_id(UID, 1, "5a" * 32)


def row(i: int) -> OutboxMessage:
    return OutboxMessage(i, f"p/study/1.{i}", b"{}", 1)


# -- strikes -------------------------------------------------------------------------------


def test_an_outage_with_several_rows_in_flight_strikes_nobody() -> None:
    strikes = Strikes(max_attempts=1)
    assert strikes.connection_lost([row(3), row(1), row(2)]) is None
    assert [strikes.count(i) for i in (1, 2, 3)] == [0, 0, 0]
    assert strikes.suspects() == 3
    sent = []
    while (suspect := strikes.next_suspect()) is not None:  # one at a time, oldest first
        sent.append(suspect.id)
        strikes.forget(suspect.id)  # acknowledged
    assert sent == [1, 2, 3]


def test_a_row_alone_in_flight_gets_a_strike_each_break_until_max_attempts() -> None:
    strikes = Strikes(max_attempts=3)
    strikes.connection_lost([row(1), row(2)])  # suspects, no strike
    assert strikes.connection_lost([row(1)]) is None
    assert strikes.connection_lost([row(1)]) is None
    assert strikes.is_suspect(1) and strikes.count(1) == 2
    assert strikes.connection_lost([row(1)]) == row(1)  # third: set it aside
    assert not strikes.is_suspect(1)
    assert strikes.next_suspect() == row(2)  # the other one is still tried alone


def test_refusals_count_as_attempts_and_retry_leaves_one_attempt() -> None:
    strikes = Strikes(max_attempts=3)
    assert [strikes.failed(7) for _ in range(3)] == [1, 2, 3]
    assert strikes.exhausted(3) and not strikes.exhausted(2)
    strikes.forget(7)  # set aside
    assert strikes.retry([row(7), row(8)]) == 2
    assert strikes.retry([row(7)]) == 0  # already on probation
    assert strikes.exhausted(strikes.failed(7))  # one more failure sets it aside again
    with pytest.raises(ValueError):
        Strikes(max_attempts=0)


# -- acks ----------------------------------------------------------------------------------


def test_the_ack_alert_id_shape_is_the_one_results_give() -> None:
    ack = parse_ack(UID, json.dumps({"alert_id": ALERT}).encode())
    assert ack == Ack(UID, ALERT, None, None)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty payload"),
        (b"x" * (MAX_ACK_BYTES + 1), f"payload of {MAX_ACK_BYTES + 1} bytes"),
        (b"[" * 3000, "JSON nested too deeply"),
        (b"\xff\xfe", "not JSON"),
        (b'["a"]', "not a JSON object"),
        (b'{"by": "x"}', "no alert_id"),
        (json.dumps({"alert_id": "0" * 31 + "\n"}).encode(), "not an alert id"),
        (json.dumps({"alert_id": "x\n2026 forged log line"}).encode(), "not an alert id"),
        (json.dumps({"alert_id": ALERT, "by": "b" * (MAX_BY_CHARS + 1)}).encode(), "'by' longer"),
        (json.dumps({"alert_id": ALERT, "at": "t" * 65}).encode(), "'at' longer"),
    ],
)
def test_acks_that_are_not_acks_are_refused_with_a_short_reason(
    payload: bytes, reason: str
) -> None:
    with pytest.raises(AckRefused, match=reason) as info:
        parse_ack(UID, payload)
    assert len(str(info.value)) < 80


def test_ack_on_a_topic_level_that_is_not_a_uid_is_refused() -> None:
    for uid in ("1.2\n3", "x", "1" * 65, ""):
        with pytest.raises(AckRefused, match="not a StudyInstanceUID"):
            parse_ack(uid, json.dumps({"alert_id": ALERT}).encode())


@given(by=st.text(max_size=MAX_BY_CHARS), at=st.text(max_size=64))
def test_by_and_at_are_stored_without_control_characters(by: str, at: str) -> None:
    ack = parse_ack(UID, json.dumps({"alert_id": ALERT, "by": by, "at": at}).encode())
    assert ack.by is not None and ack.at is not None
    assert not has_control(ack.by) and not has_control(ack.at)
    assert len(ack.by) <= 4 * MAX_BY_CHARS


@given(payload=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_parse_ack_never_raises_anything_but_ack_refused(payload: bytes) -> None:
    try:
        ack = parse_ack(UID, payload)
    except AckRefused:
        return
    assert len(ack.alert_id) == 32


def test_ack_flood_is_counted_and_logged_once_a_minute(caplog) -> None:
    clock = [0.0]
    log = AckLog(every=60.0, clock=lambda: clock[0])
    caplog.set_level(logging.DEBUG, logger="edge_agent.mqtt.acks")
    for i in range(30_000):
        log.refused(f"1.{i}", "not JSON") if i % 2 else log.unknown(Ack(UID, ALERT, None, None))
        clock[0] += 0.001  # 30 s of flood
        log.flush()
    assert len(caplog.records) == 1  # the first one
    clock[0] = 61.0
    log.flush()
    log.flush()
    assert len(caplog.records) == 2
    assert "29999 more acks" in caplog.records[1].getMessage()
    assert log.counters() == {"acks_received": 0, "acks_unknown": 15000, "acks_refused": 15000}
    taken = log.take()
    assert taken["acks_refused"] == 15000 and log.take()["acks_refused"] == 0
    log.untake(taken)
    assert log.take() == taken


# -- topics and text -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("p/study/1.2.3", None),
        ("p/study/1.2.3\x0b", "control character"),
        ("p/study/1.2.3\n", "control character"),
        ("p/study/\x00", "NUL"),
        ("p/study/\x9b", "control character"),
        ("p/study/+", "wildcard"),
        ("p/#", "wildcard"),
        ("p/\udc80", "not valid UTF-8"),
        ("", "empty"),
        ("p/" + "é" * 40000, "bytes (limit 65535)"),
    ],
)
def test_topics_the_broker_could_never_take(topic: str, problem: str | None) -> None:
    found = topic_problem(topic)
    assert found is None if problem is None else problem in (found or "")


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=50))
def test_a_topic_without_a_problem_is_valid_utf8_without_controls_or_wildcards(t: str) -> None:
    if topic_problem(t) is None:
        assert t and "+" not in t and "#" not in t and not has_control(t)
        assert len(t.encode()) <= 65535


@given(st.text(max_size=400))
def test_printable_is_one_line_of_bounded_visible_text(text: str) -> None:
    out = printable(text, limit=100)
    assert not has_control(out) and len(out.splitlines()) <= 1
    assert len(out) <= 100 + len(f"…({len(text)} chars)")
    if not has_control(text) and len(text) <= 100:
        assert out == text


def test_printable_escapes_newlines_and_ansi() -> None:
    assert printable("a\nb\x1b[31m") == "a\\nb\\x1b[31m"
    assert printable("x" * 10, limit=4) == "xxxx…(10 chars)"


def test_one_wording_for_a_silent_broker() -> None:
    assert silent_broker("h", 1883, 5) == (
        "MQTT broker h:1883 accepts connections but did not answer the MQTT CONNECT within 5 s"
    )


# -- the store's set-aside rows ------------------------------------------------------------


def test_a_set_aside_row_no_longer_holds_back_its_study(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")

    def queue(topic: str, payload: bytes) -> None:  # a message committed with its state
        path = f"{len(store.outbox_messages())}.dcm"
        message = Message("result", topic, payload)
        store.record_file(path, 1, 1, "rejected", "x", time.time(), message=message)

    queue("p/study/1.5", b"1")  # revisions 1 and 2 of one study, then another study
    queue("p/study/1.5", b"2")
    queue("p/study/1.6", b"3")
    first, _, _ = store.outbox_messages()
    assert [m.payload for m in store.outbox_pending(10, ())] == [b"1", b"3"]
    assert store.outbox_set_aside(first.id, "broke the connection") is True
    assert store.outbox_set_aside(first.id, "again") is False  # counted once
    assert [m.payload for m in store.outbox_pending(10, ())] == [b"2", b"3"]
    assert store.outbox_set_aside_messages() == [first]
    counters = store.counters()
    assert counters["outbox_set_aside"] == 1 and counters["outbox_depth"] == 3
    store.outbox_delete(first.id)  # a retry got through
    assert store.outbox_set_aside_messages() == [] and store.counters()["outbox_set_aside"] == 0
    assert store.outbox_set_aside(first.id, "gone") is False
    store.close()


def test_state_database_of_schema_3_is_migrated_to_today(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite3"
    Store(path).close()
    as_schema(path, 3)  # outbox without set-aside columns
    db = sqlite3.connect(path)
    db.executescript(
        "INSERT INTO outbox (kind, topic, payload, created_at)"
        " VALUES ('result', 'p/study/1', x'7b7d', 1.0);"
    )
    db.commit()
    db.close()
    store = Store(path)  # 3 -> 4 (set-aside columns) -> 5 (pacs_outbox) -> ...
    version = store._conn().execute("SELECT value FROM meta WHERE key = 'schema_version'")
    assert version.fetchone() == (str(SCHEMA_VERSION),)
    (pending,) = store.outbox_pending(5, ())
    assert store.outbox_set_aside(pending.id, "why") is True
    assert store.outbox_pending(5, ()) == [] and store.outbox_set_aside_messages() == [pending]
    store.close()
