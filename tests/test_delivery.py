"""Delivery that loses nothing: order per study, outbox cap, broker outages, power cuts,
acknowledgements and re-notification — against real Mosquitto brokers and, for the long
ones, the daemon as its own process (``python -m edge_agent.cli run``).

Results reach the daemon's outbox in two ways here: scored from simulated DICOM written
into its watch folder (the whole road), or committed into its state database by the test
with :meth:`Store.commit_result`, exactly as the scoring thread does (a burst of 100 without
scoring 100 studies on two cores). Injecting daemons run with a quiet period of a day, so
they never complete or score the injected studies themselves.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.brokers import Mosquitto, Received, Subscriber
from helpers.daemon import MATRIX, Daemon, check_payload
from helpers.delivery import (
    BASE,
    DEVICE,
    SITE,
    UID,
    Injector,
    delivered,
    make_result,
    start,
    study_messages,
    write_config,
)
from helpers.old_state import as_schema
from helpers.polling import wait_until

from edge_agent.config import Settings
from edge_agent.mqtt import Publisher
from edge_agent.results import (
    SCHEMA_FILE,
    StudyResult,
)
from edge_agent.simulate import simulate
from edge_agent.store import SCHEMA_VERSION, Message, Store

# -- helpers -------------------------------------------------------------------------------


def assert_in_order(messages: list[Received]) -> None:
    """Per study, (revision, notify_count) never goes down in arrival order (copies of the
    latest message may repeat: delivery is at least once)."""
    latest: dict[str, tuple[int, int]] = {}
    for m in messages:
        body = m.json()
        key = (body["revision"], body.get("notify_count", 1))
        uid = body["study_instance_uid"]
        assert key >= latest.get(uid, key), f"study {uid}: {key} arrived after {latest[uid]}"
        latest[uid] = key


def state_counters(tmp: Path) -> dict[str, int]:
    """The daemon's counters, read from its state database (a second reader; WAL)."""
    db = sqlite3.connect(f"file:{tmp / 'state' / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        results = db.execute("SELECT count(*) FROM results").fetchone()[0]
        depth = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return {"results": int(results), "outbox_depth": int(depth)}
    except sqlite3.OperationalError:  # not created yet
        return {"results": 0, "outbox_depth": -1}
    finally:
        db.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def dashboard(broker: Mosquitto) -> Iterator[Subscriber]:
    """A dashboard with a persistent session on P/#: it gets what was published while a
    broker restart had it disconnected."""
    sub = Subscriber(broker, f"{BASE}/#", persistent=True)
    yield sub
    sub.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        d.kill()


def settings_for(broker: Mosquitto, **mqtt: Any) -> Settings:
    return Settings(
        site=SITE, device_id=DEVICE, mqtt={"host": broker.host, "port": broker.port, **mqtt}
    )


# -- the store: order, cap, migration ------------------------------------------------------


def test_outbox_offers_one_message_per_study_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    inject = Injector(store)
    a1 = inject.result(f"{UID}.1", "urgent")
    b1 = inject.result(f"{UID}.2", "routine")
    a2 = inject.result(f"{UID}.1", "review")  # late instance: revision 2
    store.record_file(
        "bad.dcm", 1, 1, "rejected", "not DICOM", time.time(),
        message=Message("rejected", f"{BASE}/rejected", b'{"path":"bad.dcm"}'),
    )  # fmt: skip
    store.record_file(
        "bad2.dcm", 1, 1, "rejected", "not DICOM", time.time(),
        message=Message("rejected", f"{BASE}/rejected", b'{"path":"bad2.dcm"}'),
    )  # fmt: skip
    assert a2.revision == 2

    def offered(exclude: set[int] = set()) -> list[bytes]:  # noqa: B006
        return [m.payload for m in store.outbox_pending(10, exclude)]

    head = store.outbox_pending(10, ())
    # revision 2 of study 1 waits for revision 1; rejected-file messages are not ordered
    assert [m.payload for m in head] == [
        a1.to_json_bytes(),
        b1.to_json_bytes(),
        b'{"path":"bad.dcm"}',
        b'{"path":"bad2.dcm"}',
    ]
    assert len(store.outbox_messages()) == 5  # queued, all of them
    # in flight (excluded) still blocks its study
    assert offered({head[0].id}) == [m.payload for m in head[1:]]
    store.outbox_delete(head[0].id)  # PUBACK
    assert offered() == [
        b1.to_json_bytes(),
        a2.to_json_bytes(),
        b'{"path":"bad.dcm"}',
        b'{"path":"bad2.dcm"}',
    ]
    store.close()


def test_cap_drops_oldest_routine_first_then_review_never_urgent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.state.outbox")
    store = Store(tmp_path / "s.sqlite3", outbox_max_messages=10)
    inject = Injector(store)
    plan = ["urgent", "routine", "review", "not_scored", "urgent", "review", "routine", "urgent"]
    made = [inject.result(f"{UID}.{i}", triage) for i, triage in enumerate(plan)]
    assert store.counters()["outbox_near_cap"] is True  # 8 of 10
    assert "outbox near its cap: 8 messages of 10 (80%)" in caplog.text
    assert store.counters()["outbox_dropped"] == 0
    for i in range(8, 20):  # 12 more urgent results
        made.append(inject.result(f"{UID}.{i}", "urgent"))
    kept = {json.loads(m.payload)["alert_id"] for m in store.outbox_messages()}
    by_triage = {t: {r.alert_id for r in made if r.triage == t} for t in set(plan)}
    assert by_triage["urgent"] <= kept  # every urgent result is still queued
    assert not kept & (by_triage["routine"] | by_triage["not_scored"] | by_triage["review"])
    counters = store.counters()
    assert counters["outbox_dropped"] == 5
    assert counters["outbox_depth"] == 15  # over the cap: urgent results only
    drops = [r.getMessage() for r in caplog.records if "dropped the" in r.getMessage()]
    # routine and not_scored first (oldest first), then review
    assert [d.split(" study result")[0].split("dropped the ")[1] for d in drops] == [
        "routine",
        "not_scored",
        "routine",
        "review",
        "review",
    ]
    assert made[1].study_instance_uid in drops[0] and made[1].alert_id in drops[0]
    assert "only urgent results are left: nothing dropped" in caplog.text
    # a new routine result while only urgent ones are queued: the new one is dropped
    inject.result(f"{UID}.99", "routine")
    assert store.counters()["outbox_dropped"] == 6
    assert store.outbox_depth() == 15
    assert "dropped the routine study result" in caplog.records[-1].getMessage()
    assert "(new)" in caplog.records[-1].getMessage()
    # delivering brings it below 80 % again, and the status says so
    for m in store.outbox_messages():
        store.outbox_delete(m.id)
    assert store.counters()["outbox_near_cap"] is False
    assert "outbox below 80% of its cap again" in caplog.text
    store.close()


def test_state_database_of_schema_1_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    Store(path).close()
    as_schema(path, 1)  # outbox without triage
    db = sqlite3.connect(path)
    db.executescript(
        "INSERT INTO results VALUES ('A1', '1.2', 1, 'review', x'7b7d', 1.0);"
        "INSERT INTO outbox (kind, topic, payload, alert_id, created_at)"
        " VALUES ('result', 'p/study/1.2', x'7b7d', 'A1', 1.0);"
    )
    db.commit()
    db.close()
    store = Store(path)
    row = store._conn().execute("SELECT triage FROM outbox").fetchone()
    version = store._conn().execute("SELECT value FROM meta WHERE key = 'schema_version'")
    assert row == ("review",) and version.fetchone() == (str(SCHEMA_VERSION),)
    assert [m.payload for m in store.outbox_pending(5, ())] == [b"{}"]
    store.close()


def test_notify_count_is_optional_in_the_schema_and_renotification_keeps_the_rest() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["properties"]["notify_count"]["default"] == 1
    assert "notify_count" not in schema["required"] and "alert_id" in schema["required"]
    first = make_result(f"{UID}.5", 1, "urgent")
    body = json.loads(first.to_json_bytes())
    assert body["notify_count"] == 1
    del body["notify_count"]  # a payload from an agent before the field: read as 1
    assert StudyResult.model_validate(body).notify_count == 1
    again = json.loads(first.renotification(3).to_json_bytes())
    assert again.pop("notify_count") == 3 and again == body


# -- order through a real broker -----------------------------------------------------------


class FlakyStore(Store):
    """A store where the delete of one row after its PUBACK fails once (disk full, a
    locked database)."""

    fail_once: int | None = None

    def outbox_delete(self, message_id: int) -> None:
        if message_id == self.fail_once:
            self.fail_once = None
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        super().outbox_delete(message_id)


def test_revision_never_arrives_after_the_next_one_was_acknowledged(
    tmp_path: Path, broker: Mosquitto, dashboard: Subscriber, caplog: pytest.LogCaptureFixture
) -> None:
    """Revision 1's delete fails after its PUBACK, so it is published again: that copy
    must go before revision 2 (a publisher that sends the whole batch at once resends it
    after revision 3)."""
    caplog.set_level(logging.INFO)
    store = FlakyStore(tmp_path / "s.sqlite3")
    inject = Injector(store)
    uid = f"{UID}.7"
    revisions = [inject.result(uid, t) for t in ("urgent", "review", "routine")]
    others = [inject.result(f"{UID}.8.{i}") for i in range(5)]
    store.fail_once = store.outbox_pending(1, ())[0].id  # revision 1's row
    pub = Publisher(settings_for(broker), store, status=store.counters)
    pub.start()
    try:
        wait_until(lambda: store.outbox_depth() == 0, 10, "the outbox drained")
        wait_until(lambda: len(delivered(dashboard)) == 8, 5, "8 results")
    finally:
        pub.stop(timeout=2.0)
        store.close()
    messages = study_messages(dashboard)
    assert_in_order(messages)
    own = [m.json()["revision"] for m in messages if m.topic.endswith(f"/{uid}")]
    assert own == [1, 1, 2, 3]  # the failed delete's row went again, before revision 2
    assert set(delivered(dashboard)) == {r.alert_id for r in revisions + others}
    assert "could not delete delivered study result" in caplog.text


# -- the cap, seen in status ---------------------------------------------------------------


def test_status_says_near_cap_and_urgent_results_survive_a_full_outbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that refuses the study topics (ACL) keeps every result in the outbox."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    deny = f"topic readwrite {BASE}/status\ntopic read {BASE}/ack/#\n"
    allow = f"topic readwrite {BASE}/#\n"
    with Mosquitto(tmp_path / "acl", acl=deny) as refusing:
        status = Subscriber(refusing, f"{BASE}/status")
        store = Store(tmp_path / "s.sqlite3", outbox_max_messages=10)
        inject = Injector(store)
        made = [inject.result(f"{UID}.{i}", "routine" if i % 3 else "urgent") for i in range(9)]
        pub = Publisher(
            settings_for(refusing, status_interval_seconds=0.3),
            store,
            status=store.counters,
            resend_after_seconds=0.3,
        )
        pub.start()
        try:
            (near,) = status.wait_for(lambda m: m.json().get("outbox_near_cap") is True)[:1]
            body = near.json()
            assert (body["outbox_depth"], body["outbox_max_messages"]) == (9, 10)
            assert body["outbox_dropped"] == 0
            made += [inject.result(f"{UID}.1{i}", "urgent") for i in range(8)]
            status.wait_for(lambda m: m.json().get("outbox_dropped") == 6, timeout=5)
            queued = {json.loads(m.payload)["alert_id"] for m in store.outbox_messages()}
            urgent = {r.alert_id for r in made if r.triage == "urgent"}
            assert queued == urgent and len(urgent) == 11
            assert store.counters()["outbox_depth"] == 11
            # the broker lets them through again: everything queued goes, urgent ones all
            dashboard = Subscriber(refusing, f"{BASE}/study/+")
            refusing.reload(acl=allow)
            wait_until(lambda: store.outbox_depth() == 0, 15, "the outbox drained")
            got = {m.json()["alert_id"] for m in dashboard.messages}
            assert got == urgent
            dashboard.close()
        finally:
            pub.stop(timeout=1.0)
            status.close()
            store.close()
    assert caplog.text.count("dropped the routine study result") == 6
    assert "outbox near its cap: 8 messages of 10" in caplog.text


# -- broker outages ------------------------------------------------------------------------


@pytest.mark.slow
def test_burst_of_100_with_the_broker_stopped_for_10_s(
    tmp_path: Path, broker: Mosquitto, dashboard: Subscriber, daemons: list[Daemon]
) -> None:
    """The daemon process delivers a burst of 100 results; the broker is stopped a third
    of the way in and started again 10 s later: all 100 arrive, in order per study."""
    daemon = Daemon(write_config(tmp_path, broker, quiet=86400), tmp_path / "agent.log")
    daemons.append(daemon)
    start(daemon, dashboard)
    inject = Injector(Store(tmp_path / "state" / "state.sqlite3"))
    triages = ["urgent", "review", "routine", "not_scored"]
    stopped = 0.0
    for i in range(100):
        # studies 0-9 get a second revision later in the burst
        inject.result(f"{UID}.{i % 90}", triages[i % 4])
        time.sleep(0.02)
        if i == 33:
            broker.stop()
            stopped = time.monotonic()
    wait_until(lambda: time.monotonic() - stopped >= 10, 15, "10 s of outage")
    assert state_counters(tmp_path)["outbox_depth"] > 0
    broker.start()
    wait_until(lambda: len(delivered(dashboard)) == 100, 60, "all 100 results")
    assert delivered(dashboard) == inject.sent  # byte for byte
    assert_in_order(study_messages(dashboard))
    wait_until(lambda: state_counters(tmp_path)["outbox_depth"] == 0, 10, "an empty outbox")
    assert daemon.alive()
    log = daemon.log.read_text()
    assert "lost the MQTT broker" in log and "Traceback" not in log
    inject.store.close()
    # the retained status, refreshed every second, carries the counters and the outage
    (status,) = dashboard.wait_for(
        lambda m: m.topic == f"{BASE}/status" and m.json().get("published") == 100, timeout=5
    )[-1:]
    body = status.json()
    assert body["state"] == "online" and body["outbox_depth"] == 0
    assert (body["studies_seen"], body["studies_scored"], body["results"]) == (90, 90, 100)
    assert (body["outbox_dropped"], body["outbox_near_cap"]) == (0, False)
    assert (body["outbox_set_aside"], body["outbox_on_probation"]) == (0, 0)  # an outage
    assert body["provider"] == "CPUExecutionProvider" and body["model"]
    assert f"cannot connect to {broker.host}:{broker.port}" in body["mqtt_last_error"]
    assert body["last_error"] is None


@pytest.mark.slow
def test_broker_stopped_mid_burst_of_simulated_studies(
    tmp_path: Path, broker: Mosquitto, dashboard: Subscriber, daemons: list[Daemon]
) -> None:
    """The whole road: simulated DICOM, the daemon scoring it, the broker stopped after the
    first results and started again 10 s later: every study is delivered."""
    daemon = Daemon(write_config(tmp_path, broker, quiet=1.0), tmp_path / "agent.log")
    daemons.append(daemon)
    start(daemon, dashboard)
    watch = tmp_path / "incoming"
    uids = {s.study_instance_uid for s in simulate(watch, studies=16, seed=41, **MATRIX)}
    wait_until(lambda: len(delivered(dashboard)) >= 2, 60, "the first results")
    broker.stop()
    stopped = time.monotonic()
    wait_until(lambda: time.monotonic() - stopped >= 10, 15, "10 s of outage")
    broker.start()
    wait_until(lambda: len(delivered(dashboard)) == 16, 90, "all 16 results")
    results = [json.loads(p) for p in delivered(dashboard).values()]
    assert {r["study_instance_uid"] for r in results} == uids
    for r in results:
        check_payload(r)
    assert daemon.alive()


# -- power cuts ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_10_random_moments_during_a_burst(
    tmp_path: Path, broker: Mosquitto, dashboard: Subscriber, daemons: list[Daemon]
) -> None:
    """Ten rounds: the daemon comes up, 10 results are committed, and it is SIGKILLed at a
    random moment in the next 1.2 s (its drain wakes within 1 s: before, during or after
    handing them to the broker). Then once more without a kill."""
    rng = random.Random(20261204)
    daemon = Daemon(write_config(tmp_path, broker, quiet=86400), tmp_path / "agent.log")
    daemons.append(daemon)
    inject = Injector(Store(tmp_path / "state" / "state.sqlite3"))
    triages = ["urgent", "review", "routine", "not_scored"]
    for round_ in range(11):
        start(daemon, dashboard)
        for n in range(round_ * 10, round_ * 10 + 10):
            inject.result(f"{UID}.{n % 100}", triages[n % 4])  # 10 second revisions at last
        if round_ < 10:
            time.sleep(rng.uniform(0.0, 1.2))
            daemon.kill()
    assert daemon.log.read_text().count("edge-agent stopped") == 0  # killed, never stopped
    wait_until(lambda: len(delivered(dashboard)) == 110, 60, "all 110 results")
    assert delivered(dashboard) == inject.sent  # one content per alert_id, the committed one
    assert_in_order(study_messages(dashboard))
    wait_until(lambda: state_counters(tmp_path)["outbox_depth"] == 0, 10, "an empty outbox")
    assert "Traceback" not in daemon.log.read_text()
    inject.store.close()


BASELINE = textwrap.dedent(
    """
    # THE COMPARISON, not the agent: a typical paho publisher. QoS 1, paho's in-memory
    # queue, and the job is deleted once publish() has returned.
    import json, os, sys, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    host, port, jobs, base = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="baseline-publisher",
        protocol=mqtt.MQTTv5,
    )
    client.on_connect = lambda *args: print("connected", flush=True)
    client.reconnect_delay_set(1, 2)
    client.connect_async(host, port)
    client.loop_start()
    while True:
        # Finished jobs only: a job is written as a hidden .tmp file and renamed, and a
        # .tmp name listed here may be gone (renamed) before it is opened.
        for name in sorted(n for n in os.listdir(jobs) if n.endswith(".json")):
            path = os.path.join(jobs, name)
            with open(path, "rb") as f:
                payload = f.read()
            uid = json.loads(payload)["study_instance_uid"]
            client.publish(f"{base}/study/{uid}", payload, qos=1)
            os.remove(path)
        time.sleep(0.05)
    """
)
BASELINE_BASE = "baseline/v1/site/box"


class Baseline:
    """The comparison publisher as its own process, fed one job file per study result."""

    def __init__(self, broker: Mosquitto, jobs: Path) -> None:
        self.broker, self.jobs = broker, jobs
        jobs.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log(self) -> Path:
        return self.jobs.parent / f"baseline-{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        args = [str(self.jobs), BASELINE_BASE]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", BASELINE, self.broker.host, str(self.broker.port), *args],
                stdout=out,
            )

    def connected(self) -> bool:
        return "connected" in self.log.read_text()

    def job(self, n: int, uid: str) -> None:
        tmp = self.jobs / f".{n:04d}.tmp"
        tmp.write_text(json.dumps({"study_instance_uid": uid}))
        tmp.rename(self.jobs / f"{n:04d}.json")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_the_baseline_publisher_reads_only_finished_jobs(tmp_path: Path, broker: Mosquitto) -> None:
    """A job's .tmp name listed while it is renamed is gone when opened (a dangling link
    stands in for it, deterministically): before, the baseline died of FileNotFoundError
    (seen once in a full run); now it publishes the finished job."""
    sub = Subscriber(broker, f"{BASELINE_BASE}/study/+")
    baseline = Baseline(broker, tmp_path / "jobs")
    try:
        (baseline.jobs / ".0000.tmp").symlink_to(tmp_path / "renamed-away")
        baseline.start()
        baseline.job(1, UID)
        sub.wait_for(count=1, timeout=20)
        assert baseline.proc is not None and baseline.proc.poll() is None
    finally:
        baseline.kill()
        sub.close()


@pytest.mark.slow
def test_uplink_down_and_power_cut_agent_delivers_25_typical_publisher_5(
    tmp_path: Path, broker: Mosquitto, dashboard: Subscriber, daemons: list[Daemon]
) -> None:
    """5 studies, then the uplink down while 20 more arrive and are scored, the box's power
    cut (SIGKILL) during the outage, then both back: the agent delivers all 25; a typical
    paho publisher fed the same 25 results delivers only the first 5."""
    baseline_sub = Subscriber(broker, f"{BASELINE_BASE}/study/+", persistent=True)
    baseline = Baseline(broker, tmp_path / "baseline-jobs")
    daemon = Daemon(write_config(tmp_path, broker, quiet=1.0), tmp_path / "agent.log")
    daemons.append(daemon)
    try:
        baseline.start()
        start(daemon, dashboard)
        watch = tmp_path / "incoming"
        first = list(simulate(watch, studies=5, seed=77, **MATRIX))
        later = list(simulate(tmp_path / "later", studies=20, seed=78, **MATRIX))
        studies = first + later
        for n, s in enumerate(first):
            baseline.job(n, s.study_instance_uid)
        wait_until(lambda: len(delivered(dashboard)) == 5, 60, "the first 5 agent results")
        baseline_sub.wait_for(count=5, timeout=10)

        broker.stop()  # the uplink goes down
        for n, s in enumerate(later, start=5):
            for p in s.paths:
                p.rename(watch / p.name)  # as a modality writes: complete files appear
            baseline.job(n, s.study_instance_uid)
        wait_until(lambda: state_counters(tmp_path)["results"] == 25, 90, "25 studies scored")
        wait_until(lambda: not any(baseline.jobs.iterdir()), 10, "the baseline took its jobs")
        daemon.kill()  # power cut, during the outage
        baseline.kill()

        broker.start()  # both back
        daemon.start()
        baseline.start()
        wait_until(lambda: len(delivered(dashboard)) == 25, 60, "all 25 agent results")
        # the restarted baseline is connected: it would have sent whatever it still had
        wait_until(baseline.connected, 10, "the restarted baseline connected")
        time.sleep(1.0)
    finally:
        baseline.kill()
        baseline_sub.close()
    agent = [json.loads(p) for p in delivered(dashboard).values()]
    assert {r["study_instance_uid"] for r in agent} == {s.study_instance_uid for s in studies}
    for r in agent:
        check_payload(r)
    baseline_uids = {m.json()["study_instance_uid"] for m in baseline_sub.messages}
    assert baseline_uids == {s.study_instance_uid for s in first}  # 5 of 25


# -- acknowledgement and re-notification ---------------------------------------------------


def notifications(sub: Subscriber, alert: str) -> list[int]:
    return [
        m.json().get("notify_count", 1)
        for m in study_messages(sub)
        if m.json()["alert_id"] == alert
    ]


@pytest.mark.slow
def test_unacknowledged_urgent_results_are_renotified_until_ack_or_limit(
    tmp_path: Path, broker: Mosquitto, dashboard: Subscriber, daemons: list[Daemon]
) -> None:
    config = write_config(tmp_path, broker, quiet=86400, renotify_seconds=1.0, renotify_limit=4)
    daemon = Daemon(config, tmp_path / "agent.log")
    daemons.append(daemon)
    start(daemon, dashboard)
    inject = Injector(Store(tmp_path / "state" / "state.sqlite3"))
    a = inject.result(f"{UID}.1", "urgent")  # never acknowledged: limit
    b = inject.result(f"{UID}.2", "urgent")  # acknowledged after its 2nd notification
    c = inject.result(f"{UID}.3", "review")  # not urgent: never re-notified
    d1 = inject.result(f"{UID}.4", "urgent")
    d2 = inject.result(f"{UID}.4", "urgent")  # revision 2 supersedes revision 1

    wait_until(lambda: 2 in notifications(dashboard, b.alert_id), 10, "b's 2nd notification")
    ack = {"alert_id": b.alert_id, "by": "dashboard-1", "at": "2026-12-04T15:00:00Z"}
    dashboard.publish(f"{BASE}/ack/{b.study_instance_uid}", json.dumps(ack))
    # an ack naming revision 1's alert does not silence revision 2
    old = {"alert_id": d1.alert_id, "by": "dashboard-1", "at": "2026-12-04T15:00:01Z"}
    dashboard.publish(f"{BASE}/ack/{d1.study_instance_uid}", json.dumps(old))

    # power cut after a's 2nd notification: the schedule survives
    wait_until(lambda: 2 in notifications(dashboard, a.alert_id), 10, "a's 2nd notification")
    daemon.kill()
    daemon.start()
    wait_until(lambda: 5 in notifications(dashboard, a.alert_id), 20, "a's 5th notification")
    wait_until(lambda: 4 in notifications(dashboard, d2.alert_id), 10, "d2 re-notified")
    time.sleep(2.5)  # more than two periods: nothing beyond the limit
    inject.store.close()

    seen = delivered(dashboard)
    assert sorted(set(notifications(dashboard, a.alert_id))) == [1, 2, 3, 4, 5]
    assert sorted(set(notifications(dashboard, b.alert_id)))[:2] == [1, 2]
    assert max(notifications(dashboard, b.alert_id)) <= 3  # one may have been on its way
    assert set(notifications(dashboard, c.alert_id)) == {1}
    assert set(notifications(dashboard, d1.alert_id)) == {1}  # superseded before its turn
    assert c.alert_id in seen and d1.alert_id in seen
    # every re-notification is the first publication with only notify_count changed
    for m in study_messages(dashboard):
        body = m.json()
        first = json.loads(seen[body["alert_id"]])
        body.pop("notify_count"), first.pop("notify_count")
        assert body == first
    assert_in_order(study_messages(dashboard))

    store = Store(tmp_path / "state" / "state.sqlite3")
    try:
        b_state, a_state, d1_state = (store.alert(x.alert_id) for x in (b, a, d1))
        assert b_state is not None and b_state["state"] == "acknowledged"
        assert (b_state["acked_by"], b_state["acked_at"]) == ("dashboard-1", ack["at"])
        assert a_state is not None and (a_state["state"], a_state["notify_count"]) == (
            "unacknowledged",
            5,
        )
        assert d1_state is not None and d1_state["state"] == "superseded"
        assert store.alert(c.alert_id) is None
    finally:
        store.close()
    log = daemon.log.read_text()
    assert "not acknowledged after 5 notifications" in log and a.alert_id in log
    # (the ack may come again after the power cut: a QoS 1 redelivery, then "already")
    assert f"ack for study {b.study_instance_uid} alert {b.alert_id}: " in log
    assert "Traceback" not in log
    assert f"alert {d1.alert_id}: superseded" in log
