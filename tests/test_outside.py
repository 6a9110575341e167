"""What arrives from outside is data: the daemon (its own process, as systemd starts it) with a
real Mosquitto, fed a watch folder named after a patient, file names holding terminal
escapes, a StudyInstanceUID with a newline and a UID element holding a patient name.

Before: the newline UID was accepted, its result went out on a topic holding a control
character, Mosquitto dropped the connection at each attempt and delivery stopped; the
folder's name was published on ``P/rejected``; pydicom's warning quoted the name into the
log; escapes reached the log and ``edge-agent status`` raw.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from helpers.daemon import MATRIX, SITE, Collector, Daemon, resolve_file_id, write_agent_config

from edge_agent.devbroker import Mosquitto
from edge_agent.simulate import simulate

pytestmark = pytest.mark.slow

PATIENT_DIR = "DOE^JANE 19700101"
ESCAPED_NAME = "IM\x1b]0;owned\x07\x1b[2J0001.dcm"


def raw_uid(source: Path, target: Path, keyword: str, raw: bytes) -> Path:
    """``source`` copied to ``target`` with ``keyword`` holding exactly ``raw``."""
    ds = pydicom.dcmread(source)
    placeholder = ("9." * len(raw))[: len(raw) - 1] + "9"
    setattr(ds, keyword, placeholder)
    ds.save_as(target)
    data = target.read_bytes()
    assert data.count(placeholder.encode()) == 1
    target.write_bytes(data.replace(placeholder.encode(), raw))
    return target


@pytest.fixture(params=[False, True], ids=["paths private", "phi.publish_paths"])
def daemon(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Path, Daemon, Collector, bool]]:
    publish_paths: bool = request.param
    watch = tmp_path / "incoming"
    broker = Mosquitto(tmp_path / "broker").start()
    config = write_agent_config(
        tmp_path,
        broker,
        site=SITE,
        device_id="box-1",
        extra=f"[phi]\npublish_paths = {str(publish_paths).lower()}\n",
    )
    agent = Daemon(config, tmp_path / "agent.log")
    collector = Collector(broker.host, broker.port)
    agent.start()
    try:
        yield watch, agent, collector, publish_paths
    finally:
        agent.kill()
        collector.close()
        broker.stop()


def test_names_and_uids_from_outside_are_data(
    daemon: tuple[Path, Daemon, Collector, bool], tmp_path: Path
) -> None:
    watch, agent, collector, publish_paths = daemon
    (source,) = simulate(tmp_path / "modality", studies=1, seed=8, **MATRIX)
    staging = tmp_path / "staging" / PATIENT_DIR
    staging.mkdir(parents=True)
    (staging / ESCAPED_NAME).write_bytes(b"not an image")
    raw_uid(source.paths[0], staging / "newline.dcm", "StudyInstanceUID", b"1.2.3\n\x00\x0b")
    raw_uid(source.paths[0], staging / "name-in-uid.dcm", "StudyInstanceUID", b"DOE^JANE")
    (staging.parent / PATIENT_DIR).rename(watch / PATIENT_DIR)  # the folder appears whole
    collector.wait(lambda: len(collector.on("rejected")) == 3, 60, "3 rejected messages")
    (good,) = simulate(watch / "later", studies=1, seed=9, **MATRIX)
    # delivery goes on after the bad UID: the next study's result arrives
    collector.wait(
        lambda: any(
            r["study_instance_uid"] == good.study_instance_uid for r in collector.results()
        ),
        90,
        "the result of the study written after the bad files",
    )
    with collector.lock:
        topics = [t for t, _, _ in collector.messages]
        blobs = [p for _, p, _ in collector.messages]
    assert all(t.isprintable() and "\n" not in t for t in topics), topics
    assert not any(b"DOE" in b for b in blobs) or publish_paths

    rejected = collector.on("rejected")
    by_path = {resolve_file_id(agent.config, r["file_id"]): r for r in rejected}
    assert set(by_path) == {
        f"{PATIENT_DIR}/{ESCAPED_NAME}",
        f"{PATIENT_DIR}/newline.dcm",
        f"{PATIENT_DIR}/name-in-uid.dcm",
    }
    for path, message in by_path.items():
        assert set(message) <= {"path", "file_id", "sop_instance_uid", "reason"}
        assert message.get("path") == (path if publish_paths else None)
    reasons = {path.rsplit("/", 1)[1]: m["reason"] for path, m in by_path.items()}
    assert reasons["newline.dcm"] == "malformed StudyInstanceUID (holds a control character)"
    assert reasons["name-in-uid.dcm"] == (
        "malformed StudyInstanceUID (holds a character other than digits and dots)"
    )

    log = agent.log.read_text(errors="replace")
    assert "\x1b" not in log and "\x07" not in log
    assert ("DOE" in log) == publish_paths, log  # named by file id unless paths are public
    assert "Invalid value for VR UI" not in log  # pydicom's warning, which quoted the value

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    status = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "status", "--config", str(agent.config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert "\x1b" not in status.stdout
    assert f"{PATIENT_DIR}/IM\\x1b]0;owned\\x07\\x1b[2J0001.dcm" in status.stdout
    for message in rejected:
        assert message["file_id"] in status.stdout
