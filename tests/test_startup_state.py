"""Start-up with a state folder or database that cannot be used as it is.

Real ``edge-agent run``/``check`` processes on real files. Each problem is one line naming
``state_dir`` and what to do, exit 2 (the setting must change: a file, read-only, not
writable, a schema this agent does not know) or 3 for ``check`` on a damaged database, which
``run`` sets aside (never deleted, never written) before it starts with an empty state.
``check`` never writes to the database.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.brokers import Mosquitto, Subscriber
from helpers.daemon import Daemon
from helpers.polling import wait_until

from edge_agent.store import SCHEMA_VERSION, Store

SITE, DEVICE = "state-site", "box-1"
BASE = f"edge-triage/v1/{SITE}/{DEVICE}"
UNUSED_PORT = 9  # discard: nothing listens; `run` fails before it connects


def write_config(tmp: Path, state: Path, port: int = UNUSED_PORT) -> Path:
    watch = tmp / "incoming"
    watch.mkdir(exist_ok=True)
    config = tmp / "agent.toml"
    config.write_text(
        f'watch_dir = "{watch}"\nstate_dir = "{state}"\nprofile = "x86-cpu"\n'
        f'site = "{SITE}"\ndevice_id = "{DEVICE}"\nstudy_quiet_seconds = 1\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nstatus_interval_seconds = 0.5\n'
    )
    return config


def cli(
    *args: str, prefix: tuple[str, ...] = (), timeout: float = 120
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "edge_agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def assert_one_line(done: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def check_fails(config: Path, code: int, *words: str) -> None:
    done = cli("check", "--config", str(config))
    assert done.returncode == code, done.stdout + done.stderr
    (fail,) = [ln for ln in done.stdout.splitlines() if ln.startswith("FAIL state_dir")]
    for word in words:
        assert word in fail, fail


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file in ``folder`` with the sha256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def made_database(state: Path) -> Path:
    """A real state database with a little in it, closed (WAL checkpointed)."""
    store = Store(state / "state.sqlite3")
    for i in range(200):
        store.record_file(f"f{i}.dcm", 100, i, "skipped", "x" * 200, float(i))
    store.close()
    return state / "state.sqlite3"


# -- the folder ---------------------------------------------------------------------------


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("not a folder")
    config = write_config(tmp_path, state)
    assert_one_line(cli("run", "--config", str(config)), 2, "state_dir", "is a file")
    check_fails(config, 2, "is a file")
    assert state.read_text() == "not a folder"


@pytest.fixture
def read_only_state(tmp_path: Path) -> Iterator[Path]:
    """state_dir on a read-only bind mount of a folder that holds a database."""
    source, state = tmp_path / "source", tmp_path / "state"
    source.mkdir()
    state.mkdir()
    made_database(source)
    done = subprocess.run(["mount", "--bind", str(source), str(state)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(state)], check=True)
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_read_only_state_dir(tmp_path: Path, read_only_state: Path) -> None:
    config = write_config(tmp_path, read_only_state)
    assert_one_line(cli("run", "--config", str(config)), 2, "state_dir", "read-only")
    check_fails(config, 2, "read-only")


# Root ignores file modes; without these capabilities it obeys them like the agent's user.
AS_PLAIN_USER = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner")


def test_state_dir_not_writable_by_the_agents_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    made_database(state)
    state.chmod(0o555)
    before = fingerprint(state)
    config = write_config(tmp_path, state)
    prefix = AS_PLAIN_USER if os.geteuid() == 0 else ()
    if prefix and subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("root here cannot drop its file-permission capabilities (setpriv)")
    try:
        done = cli("run", "--config", str(config), prefix=prefix)
        assert_one_line(done, 2, "state_dir", "not writable", "chown")
        done = cli("check", "--config", str(config), prefix=prefix)
        assert done.returncode == 2 and "FAIL state_dir" in done.stdout, done.stdout
        assert fingerprint(state) == before
    finally:
        state.chmod(0o755)


# -- the database -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "words"),
    [(str(SCHEMA_VERSION + 1), "newer edge-agent"), ("banana", "unknown schema version")],
)
def test_a_schema_this_agent_does_not_know_is_refused_and_left_alone(
    tmp_path: Path, version: str, words: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = made_database(state)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    conn.commit()
    conn.close()
    before = fingerprint(state)
    config = write_config(tmp_path, state)
    assert_one_line(cli("run", "--config", str(config)), 2, "state_dir", words)
    check_fails(config, 2, words)
    assert fingerprint(state) == before


def garbage(db: Path) -> None:
    db.write_bytes(os.urandom(64 * 1024))


def truncated(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damage", [garbage, truncated], ids=["garbage", "truncated"])
def test_a_damaged_database_is_set_aside_and_the_agent_starts_empty(
    tmp_path: Path, mosquitto: Mosquitto, damage
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    damage(made_database(state))
    before = fingerprint(state)
    config = write_config(tmp_path, state, mosquitto.port)
    # check: a problem (exit 3, the resource is damaged), and nothing written, not even -wal.
    check_fails(config, 3, "damaged", "sets it aside")
    assert fingerprint(state) == before
    sub = Subscriber(mosquitto, f"{BASE}/status")
    daemon = Daemon(config, tmp_path / "agent.log")
    daemon.start()
    try:
        wait_until(lambda: any(m.json()["state"] == "online" for m in sub.messages), 60, "online")
        status = sub.messages[-1].json()
        assert "set aside" in (status["last_error"] or "")
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        sub.close()
    (aside,) = [p for p in state.iterdir() if p.name.startswith("state.sqlite3.corrupt-")]
    assert fingerprint(state)[aside.name] == before["state.sqlite3"]  # moved, byte for byte
    log = (tmp_path / "agent.log").read_text()
    assert str(aside) in log and f"sqlite3 {aside} .recover" in log
    # The new database is whole, and check says so.
    conn = sqlite3.connect(state / "state.sqlite3")
    assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    conn.close()
    done = cli("check", "--config", str(config))
    assert "ok   state_dir" in done.stdout, done.stdout


def test_check_reports_a_good_database_without_writing_to_it(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    made_database(state)
    before = fingerprint(state)
    config = write_config(tmp_path, state, mosquitto.port)
    done = cli("check", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"schema {SCHEMA_VERSION}, quick_check ok" in done.stdout
    assert fingerprint(state) == before  # no -wal/-shm made (root's would lock the agent out)


def test_status_json_lists_nothing_waiting(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    made_database(state)
    config = write_config(tmp_path, state)
    done = cli("status", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["scoring_waiting"] == 0


@pytest.mark.parametrize("damage", [garbage, truncated], ids=["garbage", "truncated"])
def test_status_on_a_damaged_database_is_one_line_exit_3(tmp_path: Path, damage) -> None:
    state = tmp_path / "state"
    state.mkdir()
    damage(made_database(state))
    before = fingerprint(state)
    config = write_config(tmp_path, state)
    done = cli("status", "--config", str(config))
    assert_one_line(done, 3, "state_dir", "damaged")
    assert fingerprint(state)[("state.sqlite3")] == before["state.sqlite3"]
