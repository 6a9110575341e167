"""The triage board with real peers: Mosquitto (accounts and an ACL), the real agent with the
demo bundle on simulated studies, the board as its own process, and headless Chromium.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.board_peers import (
    CHROMIUM,
    PASSWORD,
    PASSWORDS,
    PREFIX,
    USER,
    BoardProcess,
    FakeBox,
    Http,
    board_config,
    mqtt_section,
    secured_broker,
)
from helpers.brokers import Subscriber
from helpers.daemon import MATRIX, Daemon
from helpers.polling import wait_until

from edge_agent.devbroker import Mosquitto, free_port
from edge_agent.simulate import simulate

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow

SITE, DEVICE = "ward-3", "xr-1"
AGENT_BASE = f"{PREFIX}/{SITE}/{DEVICE}"
RENOTIFY_SECONDS = 2
VIEWER = "https://pacs.example.org/ohif/viewer?StudyInstanceUIDs={study_instance_uid}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = secured_broker(tmp_path / "broker").start()
    yield broker
    broker.stop()


@pytest.fixture
def board(tmp_path: Path, broker: Mosquitto) -> Iterator[BoardProcess]:
    port = free_port()
    config = board_config(tmp_path / "board", broker, port, max_wait_minutes=10, viewer_url=VIEWER)
    process = BoardProcess(config, tmp_path / "board.log", port).start()
    yield process
    process.kill()


def login(browser: Any, board: BoardProcess) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.goto(board.url + "/")
    assert page.url.endswith("/login")
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    # The first render is done once the broker indicator is set (the page's CSP forbids the
    # string evaluation wait_for_function polls with).
    page.wait_for_selector("#broker:not([data-connected='unknown'])", state="attached")
    page.evaluate("window.notReloaded = true")
    return page


def levels(page: Any) -> list[str]:
    return page.eval_on_selector_all("#rows tr", "rows => rows.map(r => r.dataset.triage)")


def agent_config(tmp_path: Path, broker: Mosquitto) -> Path:
    watch = tmp_path / "incoming"
    watch.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'watch_dir = "{watch}"\nstate_dir = "{tmp_path / "state"}"\nprofile = "x86-cpu"\n'
        f'site = "{SITE}"\ndevice_id = "{DEVICE}"\nstudy_quiet_seconds = 1.0\n'
        f"[intake]\npoll_interval_seconds = 0.2\nfile_stable_seconds = 0.3\n"
        + mqtt_section(broker, "agent", tmp_path)
        + f"status_interval_seconds = 1\nkeepalive_seconds = 5\n"
        f"renotify_seconds = {RENOTIFY_SECONDS}\nrenotify_limit = 20\n"
    )
    return config


def audit_rows(tmp_path: Path) -> list[tuple[str, str, str]]:
    with contextlib.closing(sqlite3.connect(tmp_path / "board" / "board.sqlite3")) as db:
        return db.execute("SELECT user, alert_id, outcome FROM audit").fetchall()


def agent_status(watcher: Subscriber) -> dict[str, Any]:
    found = [m.json() for m in watcher.messages if m.topic == f"{AGENT_BASE}/status"]
    return found[-1] if found else {}


def test_live_urgent_row_order_ack_to_the_agent_offline_and_restart(
    tmp_path: Path, broker: Mosquitto, board: BoardProcess, browser: Any
) -> None:
    fake = FakeBox(broker)
    now = time.time()
    # History from another box: review, routine and not scored, at different ages.
    fake.study("1.2.3.1", "routine", score=0.1, complete_at=now - 120)
    fake.study("1.2.3.2", "review", score=0.6, complete_at=now - 300)
    fake.study("1.2.3.3", "routine", score=0.2, complete_at=now - 30)
    fake.study("1.2.3.4", "not_scored", reason="no frontal chest image", complete_at=now - 20)
    fake.study("1.2.3.5", "review", score=0.55, complete_at=now - 60)

    page = login(browser, board)
    page.wait_for_selector('tr[data-study-uid="1.2.3.5"]')
    assert levels(page) == ["review", "review", "routine", "routine", "not_scored"]
    assert page.eval_on_selector_all(
        'tr[data-triage="review"]', "rows => rows.map(r => r.dataset.studyUid)"
    ) == ["1.2.3.5", "1.2.3.2"], "newest first within a level"

    # The real agent, and a status watcher that records what it says about acks.
    daemon = Daemon(agent_config(tmp_path, broker), tmp_path / "agent.log")
    daemon.start()
    try:
        run_agent_scenario(tmp_path, broker, board, browser, page, daemon, fake)
    finally:
        daemon.kill()
        fake.close()
    assert not page.errors


def run_agent_scenario(
    tmp_path: Path,
    broker: Mosquitto,
    board: BoardProcess,
    browser: Any,
    page: Any,
    daemon: Daemon,
    fake: FakeBox,
) -> None:
    watcher = AgentWatcher(broker)
    try:
        page.wait_for_selector(f'[data-box="{SITE}/{DEVICE}"][data-state="online"]', timeout=60000)
        # An abnormal study (the simulator's pneumothorax): the demo model flags it urgent.
        (study,) = simulate(tmp_path / "incoming", studies=1, abnormal=1.0, seed=4, **MATRIX)
        assert study.truth["pneumothorax"]
        uid = study.study_instance_uid
        row = page.wait_for_selector(f'tr[data-study-uid="{uid}"]', timeout=60000)
        shown = time.monotonic()
        assert page.evaluate("window.notReloaded") is True, "the row came without a reload"
        assert shown - watcher.first_result_at(uid) < 5.0  # generous: the machine is shared
        assert row.get_attribute("data-triage") == "urgent"
        assert levels(page)[0] == "urgent", "unacknowledged urgent first"
        assert "URGENT" in page.title()
        assert "DEMO" in row.inner_text()

        wait_until(lambda: watcher.notify_counts(uid) >= 2, 20, "a re-notification before ack")
        page.click(f'tr[data-study-uid="{uid}"] [data-action="ack"]')
        page.wait_for_selector(f'tr[data-study-uid="{uid}"].acked .acked-by')
        assert USER in page.inner_text(f'tr[data-study-uid="{uid}"]')
        assert "URGENT" not in page.title()
        wait_until(
            lambda: (
                agent_status(watcher.sub).get("acknowledged", 0) >= 1
                and agent_status(watcher.sub).get("urgent_unacknowledged") == 0
            ),
            20,
            "the agent's status to show the alert acknowledged",
        )
        counted = watcher.notify_counts(uid)
        time.sleep(RENOTIFY_SECONDS * 2.5)
        assert watcher.notify_counts(uid) == counted, "re-notification went on after the ack"
        ack = next(m.json() for m in watcher.sub.messages if m.topic == f"{AGENT_BASE}/ack/{uid}")
        assert ack["by"] == USER and re.fullmatch(r".+T.+Z", ack["at"])

        # The audit log has it.
        assert audit_rows(tmp_path) == [(USER, ack["alert_id"], "sent")]

        # A killed agent: its Will says offline, the page shows the box as a problem.
        daemon.kill()
        page.wait_for_selector(f'[data-box="{SITE}/{DEVICE}"][data-state="offline"]', timeout=30000)

        # Restart the board; a result published while it is down is there when it returns.
        assert board.stop() == 0
        fake.study("1.2.3.9", "urgent", score=0.95)
        board.start()
        page2 = login(browser, board)
        page2.wait_for_selector('tr[data-study-uid="1.2.3.9"]')
        acked = page2.wait_for_selector(f'tr[data-study-uid="{uid}"]')
        assert USER in acked.inner_text(), "the ack survived the restart"
        assert levels(page2)[0] == "urgent" and "1.2.3.9" in page2.inner_text("#rows tr")
        assert page2.query_selector(f'[data-box="{SITE}/{DEVICE}"][data-state="offline"]')
        assert "Denied PUBLISH" not in broker.log_text(), "the board wrote outside ack/"
        assert audit_rows(tmp_path) == [(USER, ack["alert_id"], "sent")], "the audit survived"
        page2.close()
    finally:
        watcher.close()


class AgentWatcher:
    """Records the agent's topics (with the fake box's account, which may read them)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.sub = Subscriber(
            broker, f"{AGENT_BASE}/#", username="fakebox", password=PASSWORDS["fakebox"]
        )

    def first_result_at(self, uid: str) -> float:
        """When the watcher received the study's first result (its arrival time is close
        to the agent's PUBACK; benchmarks/board.py measures the latency precisely)."""
        found = [m for m in self.sub.messages if m.topic == f"{AGENT_BASE}/study/{uid}"]
        assert found, "the board showed a result the watcher never saw"
        return found[0].received_at

    def notify_counts(self, uid: str) -> int:
        return max(
            (
                json.loads(m.payload).get("notify_count", 1)
                for m in self.sub.messages
                if m.topic == f"{AGENT_BASE}/study/{uid}"
            ),
            default=0,
        )

    def close(self) -> None:
        self.sub.close()


def test_markup_from_a_box_renders_inert(
    broker: Mosquitto, board: BoardProcess, browser: Any
) -> None:
    page = login(browser, board)
    fake = FakeBox(broker)
    try:
        evil = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
        fake.study("1.2.9.1", "urgent", label=evil)
        fake.study("1.2.9.2", "not_scored", reason=evil)
        fake.publish(
            "status",
            json.dumps({"state": "online", "model": evil, "model_version": "<b>1</b>"}),
            retain=True,
        )
        fake.publish("rejected", json.dumps({"file_id": "f1", "reason": evil}))
        page.wait_for_selector('tr[data-study-uid="1.2.9.2"]')
        page.wait_for_selector('[data-box="ward-9/fake-1"]')
        page.wait_for_timeout(300)
        assert page.evaluate("window.pwned") is None
        assert page.query_selector("body img") is None
        assert page.query_selector("#rows script, #boxes script, #rejected script") is None
        assert page.inner_text('tr[data-study-uid="1.2.9.1"] .label') == evil
        assert evil in page.inner_text("#rejected")
        # The first render (embedded JSON) is inert too.
        page.reload()
        page.wait_for_selector('tr[data-study-uid="1.2.9.1"]')
        assert page.evaluate("window.pwned") is None
        assert page.inner_text('tr[data-study-uid="1.2.9.1"] .label') == evil
        assert not page.errors
    finally:
        fake.close()


def test_refused_without_session_csrf_or_past_the_rate_limit(board: BoardProcess) -> None:
    anonymous = Http(board.url)
    status, headers, _ = anonymous.request("/events")
    assert status == 401
    assert anonymous.request("/api/state")[0] == 401
    assert anonymous.request("/", headers={})[0] == 303
    assert "script-src 'self'" in headers["content-security-policy"]

    user = Http(board.url)
    assert user.request("/login")[0] == 200
    form = f"username={USER}&password={PASSWORD.replace(' ', '+')}&csrf=".encode()
    assert user.request("/login", form)[0] == 403, "login without the form's CSRF token"
    token = user.cookie("edge_board_login")
    status, headers, _ = user.request("/login", form + token.encode())
    assert status == 303, "login with it"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    status, _, body = user.request(
        "/api/ack",
        json.dumps({"study_instance_uid": "1.2.3", "alert_id": "x"}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 403 and b"CSRF" in body, "a POST without the CSRF token"
    assert user.request("/api/state")[0] == 200
    csrf = re.search(rb'name="csrf-token" content="([^"]+)"', user.request("/")[2])
    assert csrf is not None
    big = json.dumps({"study_instance_uid": "1.2.3", "alert_id": "x" * 20000}).encode()
    headers = {"Content-Type": "application/json", "X-CSRF-Token": csrf.group(1).decode()}
    assert user.request("/api/ack", big, headers)[0] == 413
    # Chunked, without a length: bounded all the same.
    conn = http.client.HTTPConnection("127.0.0.1", board.port, timeout=10)
    cookie = f"edge_board_session={user.cookie('edge_board_session')}"
    conn.request(
        "POST",
        "/api/ack",
        iter([big[:4000], big[4000:]]),
        {**headers, "Cookie": cookie},
        encode_chunked=True,
    )
    assert conn.getresponse().status == 413
    conn.close()

    # Logging out needs the token too, and ends the session for the stream as well.
    assert user.request("/logout", b"csrf=wrong")[0] == 403
    token_field = f"csrf={csrf.group(1).decode()}".encode()
    assert user.request("/logout", token_field)[0] == 303
    assert Http(board.url).request("/events", headers={"Cookie": cookie})[0] == 401

    # Failed logins: five per minute, then refused without checking the password.
    attacker = Http(board.url)
    attacker.request("/login")
    token = attacker.cookie("edge_board_login")
    codes = [
        attacker.request("/login", f"username={USER}&password=guess{i}&csrf={token}".encode())[0]
        for i in range(6)
    ]
    assert codes == [401] * 5 + [429]
    right = f"username={USER}&password={PASSWORD.replace(' ', '+')}&csrf={token}".encode()
    assert attacker.request("/login", right)[0] == 429


def test_broker_down_is_shown_and_rows_stay(
    broker: Mosquitto, board: BoardProcess, browser: Any
) -> None:
    fake = FakeBox(broker)
    fake.study("1.2.7.1", "review", score=0.6)
    fake.close()
    page = login(browser, board)
    page.wait_for_selector('tr[data-study-uid="1.2.7.1"]')
    page.wait_for_selector('#broker[data-connected="yes"]')
    broker.stop()
    page.wait_for_selector("#broker-down:not([hidden])", timeout=15000)
    assert page.query_selector('tr[data-study-uid="1.2.7.1"]')
    page.reload()
    page.wait_for_selector('tr[data-study-uid="1.2.7.1"]')
    assert page.query_selector("#broker-down:not([hidden])")
    broker.start()
    page.wait_for_selector('#broker[data-connected="yes"]', timeout=30000)


def test_max_wait_viewer_link_rejected_files_and_search(
    broker: Mosquitto, board: BoardProcess, browser: Any
) -> None:
    fake = FakeBox(broker)
    try:
        now = time.time()
        fake.study("1.2.5.1", "routine", score=0.1, complete_at=now - 11 * 60)  # past 10 min
        fake.study("1.2.5.2", "review", score=0.6, complete_at=now - 60)
        fake.study("1.2.5.3", "routine", score=0.1, accession_number="ACC-77")
        fake.publish("rejected", json.dumps({"file_id": "f-9", "reason": "not a DICOM file"}))
        page = login(browser, board)
        page.wait_for_selector('tr[data-study-uid="1.2.5.3"]')
        page.wait_for_selector('tr[data-study-uid="1.2.5.1"].overdue')
        assert "past max wait" in page.inner_text('tr[data-study-uid="1.2.5.1"]').lower()
        assert page.query_selector('tr[data-study-uid="1.2.5.2"].overdue') is None
        link = page.get_attribute('tr[data-study-uid="1.2.5.2"] .open a', "href")
        assert link == VIEWER.format(study_instance_uid="1.2.5.2")
        assert "not a DICOM file" in page.inner_text("#rejected")
        assert "ward-9/fake-1" in page.inner_text("#rejected")

        page.fill("#search input[name=q]", "ACC-77")
        page.click("#search button")
        page.wait_for_selector('#search-rows tr[data-study-uid="1.2.5.3"]')
        page.fill("#search input[name=q]", "1.2.5.")
        page.click("#search button")
        page.wait_for_selector('#search-rows tr[data-study-uid="1.2.5.1"]')
        assert len(page.query_selector_all("#search-rows tr")) == 3
        page.fill("#search input[name=q]", "ACC-7")
        page.click("#search button")
        page.wait_for_selector("#search-empty:not([hidden])")
        assert not page.errors
    finally:
        fake.close()
