"""A complete study whose result cannot be stored stays queued and is stored later.

Real daemon process, real SQLite, real Mosquitto. The daemon is paused (SIGSTOP) the moment
its study is complete, before the result is committed; the test then makes the commit fail
(another connection holds ``BEGIN EXCLUSIVE`` past the busy timeout, or the state disk, a
small tmpfs, is full) and lets the daemon go on. Before the fix the study was dropped from
the scoring queue and only a restart scored it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.brokers import Mosquitto, Subscriber
from helpers.daemon import Daemon
from helpers.polling import wait_until
from helpers.status import cli_status

from edge_agent.simulate import simulate

SITE, DEVICE = "wait-site", "box-1"
BASE = f"edge-triage/v1/{SITE}/{DEVICE}"

pytestmark = pytest.mark.slow


def write_config(tmp: Path, broker: Mosquitto, state: Path) -> Path:
    watch = tmp / "incoming"
    watch.mkdir(exist_ok=True)
    # x86-cpu with the state disk's floor off: the floor (health.min_state_free_mib) pauses
    # the intake before the disk fills, but a disk can still fill (another writer, a floor
    # set too low), and then the commit must wait, which is what these tests prove.
    shipped = (Path(__file__).parent.parent / "firmware_configs" / "x86-cpu.toml").read_text()
    assert "\nmin_state_free_mib = 2048\n" in shipped
    profile = tmp / "x86-cpu-no-floor.toml"
    profile.write_text(
        shipped.replace("\nmin_state_free_mib = 2048\n", "\nmin_state_free_mib = 0\n").replace(
            "\nmin_state_free_percent = 5\n", "\nmin_state_free_percent = 0\n"
        )
    )
    config = tmp / "agent.toml"
    config.write_text(
        f'watch_dir = "{watch}"\nstate_dir = "{state}"\nprofile = "{profile}"\n'
        f'site = "{SITE}"\ndevice_id = "{DEVICE}"\nstudy_quiet_seconds = 1\n'
        "[intake]\npoll_interval_seconds = 0.2\nfile_stable_seconds = 0.3\n"
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nstatus_interval_seconds = 0.5\n'
    )
    return config


def study_state(db: Path, uid: str) -> tuple[str | None, int]:
    """(the study's state, its number of results), read as a second reader (WAL)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.OperationalError:
        return None, 0
    try:
        row = conn.execute(
            "SELECT state FROM studies WHERE study_instance_uid = ?", (uid,)
        ).fetchone()
        (results,) = conn.execute(
            "SELECT count(*) FROM results WHERE study_instance_uid = ?", (uid,)
        ).fetchone()
        return (row[0] if row else None), int(results)
    except sqlite3.OperationalError:  # tables not created yet
        return None, 0
    finally:
        conn.close()


def pause_when_complete(daemon: Daemon, db: Path, uid: str, timeout: float = 60.0) -> None:
    """SIGSTOP the daemon as soon as ``uid`` is complete and not yet scored."""
    deadline = time.monotonic() + timeout
    while True:
        state, results = study_state(db, uid)
        if state == "complete" and results == 0:
            daemon.signal(signal.SIGSTOP)
            break
        assert state != "scored", "the study was stored before the test could pause the daemon"
        assert time.monotonic() < deadline, f"study {uid} not complete after {timeout} s"
        time.sleep(0.003)
    assert study_state(db, uid) == ("complete", 0), "stored before the pause took effect"


def status_of(sub: Subscriber) -> dict:
    retained = [m for m in sub.messages if m.topic == f"{BASE}/status"]
    return json.loads(retained[-1].payload) if retained else {}


def is_result(uid: str):
    return lambda m: m.topic == f"{BASE}/study/{uid}"


@pytest.fixture
def sub(mosquitto: Mosquitto) -> Iterator[Subscriber]:
    s = Subscriber(mosquitto, f"{BASE}/#")
    yield s
    s.close()


def start_with_one_study(
    tmp_path: Path, mosquitto: Mosquitto, sub: Subscriber, state: Path
) -> tuple[Daemon, Path, str]:
    config = write_config(tmp_path, mosquitto, state)
    daemon = Daemon(config, tmp_path / "agent.log")
    daemon.start()
    wait_until(lambda: status_of(sub).get("state") == "online", 60, "the daemon online")
    (study,) = simulate(tmp_path / "incoming", studies=1, seed=7)
    pause_when_complete(daemon, state / "state.sqlite3", study.study_instance_uid)
    return daemon, config, study.study_instance_uid


def waiting_for(sub: Subscriber, uid: str, words: str) -> dict:
    def seen() -> bool:
        s = status_of(sub)
        listed = s.get("scoring_waiting_studies") or [{}]
        return listed[0].get("study_instance_uid") == uid and words in listed[0]["reason"]

    wait_until(seen, 60, f"status saying {uid} waits ({words})", poll=0.2)
    return status_of(sub)


def assert_logged_once(log: Path, uid: str) -> None:
    text = log.read_text()
    waits = [ln for ln in text.splitlines() if uid in ln and "stays queued" in ln]
    stored = [ln for ln in text.splitlines() if uid in ln and "stored after" in ln]
    assert len(waits) == 1, waits
    assert len(stored) == 1, stored


def test_a_result_the_locked_database_refuses_is_stored_once_the_lock_goes(
    tmp_path: Path, mosquitto: Mosquitto, sub: Subscriber
) -> None:
    state = tmp_path / "state"
    daemon, config, uid = start_with_one_study(tmp_path, mosquitto, sub, state)
    try:
        holder = sqlite3.connect(state / "state.sqlite3", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        daemon.signal(signal.SIGCONT)
        # The commit waits out the store's 30 s busy timeout, then fails: the study waits.
        status = waiting_for(sub, uid, "database is locked")
        assert status["scoring_waiting"] == 1
        report = cli_status(config)
        assert report["scoring_waiting"] == 1
        assert report["scoring_waiting_studies"][0]["study_instance_uid"] == uid
        assert not sub.messages or not any(is_result(uid)(m) for m in sub.messages)
        holder.execute("COMMIT")
        holder.close()
        (result,) = sub.wait_for(is_result(uid), timeout=90)
        assert json.loads(result.payload)["study_instance_uid"] == uid
        wait_until(lambda: status_of(sub).get("scoring_waiting") == 0, 10, "nothing waiting")
        assert cli_status(config)["scoring_waiting"] == 0
        assert_logged_once(tmp_path / "agent.log", uid)
    finally:
        daemon.signal(signal.SIGCONT)
        daemon.signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        finally:
            daemon.kill()  # never leave it running into the next test (no-op once it exited)


@pytest.fixture
def small_state_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs for state_dir (needs root, or the mount is refused: then skipped)."""
    state = tmp_path / "state"
    state.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(state)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def fill(folder: Path) -> Path:
    """Write one file until the filesystem is full."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_result_the_full_state_disk_refuses_is_stored_once_there_is_room(
    tmp_path: Path, mosquitto: Mosquitto, sub: Subscriber, small_state_disk: Path
) -> None:
    daemon, config, uid = start_with_one_study(tmp_path, mosquitto, sub, small_state_disk)
    try:
        filler = fill(small_state_disk)
        daemon.signal(signal.SIGCONT)
        status = waiting_for(sub, uid, "full")
        assert status["scoring_waiting"] == 1
        # The file edge-agent status reads is rewritten in place: a full disk does not stop it.
        report = cli_status(config)
        assert report["scoring_waiting"] == 1
        assert "full" in report["scoring_waiting_studies"][0]["reason"]
        time.sleep(4)  # a few more attempts (1 s, 2 s, …): still waiting, still logged once
        assert study_state(small_state_disk / "state.sqlite3", uid) == ("complete", 0)
        filler.unlink()
        (result,) = sub.wait_for(is_result(uid), timeout=90)
        assert json.loads(result.payload)["study_instance_uid"] == uid
        wait_until(lambda: status_of(sub).get("scoring_waiting") == 0, 10, "nothing waiting")
        assert_logged_once(tmp_path / "agent.log", uid)
    finally:
        daemon.signal(signal.SIGCONT)
        daemon.signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        finally:
            daemon.kill()  # never leave it running into the next test (no-op once it exited)
