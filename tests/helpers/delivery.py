"""Study results committed the way the scoring thread does, a daemon config for delivery
tests, and what a dashboard received."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edge_agent.results import (
    FindingResult,
    InstanceCounts,
    ModelRef,
    StudyResult,
    Timing,
    alert_id,
    iso,
)
from edge_agent.store import InstanceRecord, Message, Store
from helpers.brokers import Mosquitto, Received, Subscriber
from helpers.daemon import Daemon
from helpers.polling import wait_until

SITE, DEVICE = "delivery-site", "box-9"


BASE = f"edge-triage/v1/{SITE}/{DEVICE}"


SHA = "5a" * 32


UID = "1.2.826.0.1.3680043.10.999"


def make_result(uid: str, revision: int, triage: str) -> StudyResult:
    now = iso(time.time())
    score = {"urgent": 0.93, "review": 0.45, "routine": 0.05}.get(triage)
    findings = (
        []
        if score is None
        else [
            FindingResult(
                code="pneumothorax",
                label="Pneumothorax",
                score=score,
                urgent_threshold=0.6,
                review_threshold=0.3,
                flagged=score >= 0.3,
            )
        ]
    )
    return StudyResult(
        alert_id=alert_id(uid, revision, SHA),
        revision=revision,
        study_instance_uid=uid,
        accession_number=None,
        modality="CR",
        triage=triage,
        reason=None if findings else "no frontal chest image",
        findings=findings,
        model=ModelRef(
            name="delivery-test",
            version="1",
            sha256=SHA,
            precision="fp32",
            provider="CPUExecutionProvider",
            demo=True,
        ),
        instances=InstanceCounts(received=revision, scored=len(findings), rejected=0),
        timing=Timing(
            first_instance_at=now,
            complete_at=now,
            scored_at=now,
            published_at=now,
            inference_ms=1.0,
        ),
    )


class Injector:
    """Commits study results into a state database the way the scoring thread does: an
    instance arrives (a late one re-opens a scored study as the next revision), the study
    completes, its result and outbox message commit in one transaction."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sent: dict[str, bytes] = {}  # alert_id -> payload committed
        self._n = 0

    def result(self, uid: str, triage: str = "routine", now: float | None = None) -> StudyResult:
        self._n += 1
        sop = f"{uid}.{self._n}"
        now = time.time() if now is None else now
        record = InstanceRecord(sop, uid, None, "CR", "frontal")
        assert self.store.add_instance(f"injected/{sop}.dcm", 1, 1, record, now) == "accepted"
        self.store.complete_quiet_studies(0.0, now)
        study = self.store.study(uid)
        assert study is not None and study.state == "complete"
        result = make_result(uid, study.revision, triage)
        payload = result.to_json_bytes()
        message = Message("result", f"{BASE}/study/{uid}", payload, result.alert_id)
        assert self.store.commit_result(study, triage, message, {sop: ("scored", None)}, [], now)
        self.sent[result.alert_id] = payload
        return result


def study_messages(sub: Subscriber) -> list[Received]:
    return [m for m in sub.messages if m.topic.startswith(f"{BASE}/study/")]


def delivered(sub: Subscriber) -> dict[str, bytes]:
    """alert_id -> payload; fails on one alert_id (and notify_count) with two contents."""
    seen: dict[tuple[str, int], bytes] = {}
    for m in study_messages(sub):
        body = m.json()
        key = (body["alert_id"], body.get("notify_count", 1))
        assert seen.setdefault(key, m.payload) == m.payload, f"{key}: two different contents"
    return {alert: payload for (alert, count), payload in seen.items() if count == 1}


def write_config(tmp: Path, broker: Mosquitto, *, quiet: float, **mqtt: Any) -> Path:
    watch = tmp / "incoming"
    watch.mkdir(exist_ok=True)
    extra = "".join(f"{key} = {value!r}\n" for key, value in mqtt.items())
    config = tmp / "agent.toml"
    config.write_text(
        f'watch_dir = "{watch}"\nstate_dir = "{tmp / "state"}"\nprofile = "x86-cpu"\n'
        f'site = "{SITE}"\ndevice_id = "{DEVICE}"\nstudy_quiet_seconds = {quiet}\n'
        f"[intake]\npoll_interval_seconds = 0.2\nfile_stable_seconds = 0.3\n"
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nstatus_interval_seconds = 1\n'
        + extra
    )
    return config


def start(daemon: Daemon, sub: Subscriber, timeout: float = 30.0) -> None:
    """Start the daemon process and wait for its ``online`` status."""
    before = len(sub.messages)
    daemon.start()
    wait_until(
        lambda: any(
            m.topic == f"{BASE}/status" and m.json()["state"] == "online"
            for m in sub.messages[before:]
        ),
        timeout,
        "the daemon's online status",
    )
    assert daemon.alive()
