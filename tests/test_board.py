"""The triage board's parts without a browser: the tolerant reader, the store, the topic and
payload checks, the order, accounts, the proxy mode and the command line."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.board_peers import Http, result_payload
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.board.auth import LoginLimiter, add_user, check_password, read_users
from edge_agent.board.store import BoardStore
from edge_agent.board.subscriber import BoardClient
from edge_agent.board.worklist import Ack, rank, sort_key
from edge_agent.config import load_settings
from edge_agent.devbroker import free_port
from edge_agent.errors import ConfigError
from edge_agent.results import StudyResult, read_study_result

# -- the tolerant reader ---------------------------------------------------------------------

KEYS = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=12)
VALUES = st.one_of(st.none(), st.integers(), st.text(max_size=20), st.booleans())


@settings(max_examples=60, deadline=None)
@given(top=st.dictionaries(KEYS, VALUES, max_size=3), nested=st.dictionaries(KEYS, VALUES))
def test_unknown_fields_anywhere_are_ignored(top: dict[str, Any], nested: dict[str, Any]) -> None:
    """A newer agent's additions (at any level) are ignored; what is known is kept."""
    original = json.loads(result_payload("1.2.3", "urgent", complete_at=1e9))
    extended = json.loads(result_payload("1.2.3", "urgent", complete_at=1e9))
    for target, known in (
        (extended, {*StudyResult.model_fields, "schema"}),
        (extended["model"], set(original["model"])),
        (extended["findings"][0], {*original["findings"][0], "slab"}),
    ):
        extra = top if target is extended else nested
        target.update({k: v for k, v in extra.items() if k not in known})
    assert read_study_result(json.dumps(extended)) == StudyResult.model_validate(original)


@pytest.mark.parametrize(
    "payload",
    [b"", b"[]", b"not json", b'{"alert_id": "x"}', result_payload("1.2.3", "urgent")[:-1]],
)
def test_what_is_not_a_result_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        read_study_result(payload)


def test_a_bad_fixed_field_is_refused() -> None:
    body = json.loads(result_payload("1.2.3", "urgent"))
    body["triage"] = "<script>"
    with pytest.raises(ValueError):
        read_study_result(json.dumps(body))


# -- the store -------------------------------------------------------------------------------


def add(store: BoardStore, uid: str, triage: str, **kwargs: Any) -> dict[str, Any] | None:
    payload = result_payload(uid, triage, **kwargs)
    return store.add_result("ward", "box", read_study_result(payload), payload, 1.0)


def test_copies_and_renotifications_do_not_change_the_row(tmp_path: Path) -> None:
    store = BoardStore(tmp_path / "b.sqlite3")
    assert add(store, "1.2.3", "urgent") is not None
    assert add(store, "1.2.3", "urgent") is None, "a second copy (at least once)"
    assert add(store, "1.2.3", "urgent", notify_count=2) is None, "a re-notification"
    assert store.revisions("1.2.3")[0]["notify_count"] == 2


def test_a_level_change_is_shown_and_an_older_revision_is_ignored(tmp_path: Path) -> None:
    store = BoardStore(tmp_path / "b.sqlite3")
    add(store, "1.2.3", "urgent", revision=1)
    row = add(store, "1.2.3", "routine", revision=2, score=0.1)
    assert row is not None and row["previous_triage"] == "urgent" and row["revision"] == 2
    assert add(store, "1.2.3", "urgent", revision=1) is None
    again = add(store, "1.2.3", "routine", revision=3, score=0.2)
    assert again is not None and again["previous_triage"] == "urgent", "kept until it changes"


def test_an_ack_survives_the_narrative_revision_not_a_new_flag(tmp_path: Path) -> None:
    store = BoardStore(tmp_path / "b.sqlite3")
    first = add(store, "1.2.3", "urgent", narrative_status="pending")
    assert first is not None
    ack = Ack(alert_id=first["alert_id"], by="alice", at="2026-12-06T10:00:00.000Z")
    assert store.acknowledge("1.2.3", Ack("other", "mallory", "x")) is None, "not its alert"
    assert store.acknowledge("1.2.3", ack)["acked_by"] == "alice"
    narrated = add(store, "1.2.3", "urgent", revision=2, narrative_status="timeout")
    assert narrated is not None and narrated["acked_by"] == "alice"
    reopened = add(store, "1.2.3", "urgent", revision=3)
    assert reopened is not None and reopened["acked_by"] is None, "a new flag needs a new ack"
    store.close()
    again = BoardStore(tmp_path / "b.sqlite3")  # a restart keeps rows and acks
    assert again.study("1.2.3")["revision"] == 3
    assert [r["revision"] for r in again.revisions("1.2.3")] == [1, 2, 3]


def test_an_ack_of_the_flag_arriving_after_its_narrative_counts(tmp_path: Path) -> None:
    store = BoardStore(tmp_path / "b.sqlite3")
    flag = add(store, "1.2.3", "urgent", narrative_status="pending")
    add(store, "1.2.3", "urgent", revision=2, narrative_status="ok", narrative=None)
    assert flag is not None
    row = store.acknowledge("1.2.3", Ack(flag["alert_id"], "bob", "t"))
    assert row is not None and row["acked_by"] == "bob"


def test_search_by_uid_prefix_or_accession_number_only(tmp_path: Path) -> None:
    store = BoardStore(tmp_path / "b.sqlite3")
    add(store, "1.2.3.4", "routine", score=0.1, accession_number="ACC1")
    add(store, "1.2.9", "review", score=0.6)
    assert [r["study_instance_uid"] for r in store.search("1.2.3")] == ["1.2.3.4"]
    assert [r["study_instance_uid"] for r in store.search("ACC1")] == ["1.2.3.4"]
    assert store.search("%") == [] and store.search("_") == [], "LIKE wildcards are text"
    assert store.search("ACC") == [], "accession numbers match whole"


def test_worklist_order() -> None:
    rows = [
        {"rank": rank("routine", False), "complete_ts": 50.0, "n": "routine-new"},
        {"rank": rank("urgent", True), "complete_ts": 60.0, "n": "urgent-acked"},
        {"rank": rank("review", False), "complete_ts": 10.0, "n": "review-old"},
        {"rank": rank("urgent", False), "complete_ts": 1.0, "n": "urgent-old"},
        {"rank": rank("review", False), "complete_ts": 20.0, "n": "review-new"},
        {"rank": rank("not_scored", False), "complete_ts": 99.0, "n": "not-scored"},
        {"rank": rank("routine", False), "complete_ts": 40.0, "n": "routine-old"},
    ]
    assert [r["n"] for r in sorted(rows, key=sort_key)] == [
        "urgent-old",
        "review-new",
        "review-old",
        "urgent-acked",
        "routine-new",
        "routine-old",
        "not-scored",
    ]


# -- what arrives from the broker ------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path) -> tuple[BoardClient, BoardStore, list[tuple[str, dict[str, Any]]]]:
    store = BoardStore(tmp_path / "b.sqlite3")
    events: list[tuple[str, dict[str, Any]]] = []
    board = BoardClient(load_settings(None), store, lambda e, d: events.append((e, d)))
    return board, store, events


P = "edge-triage/v1"


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/ward/box/study/1.2.3",
        f"{P}/ward/box/study/1.2.4",  # the payload's UID is 1.2.3
        f"{P}/ward/box/study/1.2.3/extra",
        f"{P}/ward/bo x/study/1.2.3",
        f"{P}/ward/box/study/1.2.3\n",
        f"{P}/ward/box/other",
        f"{P}/ward",
        f"{P}x/ward/box/study/1.2.3",
    ],
)
def test_results_on_unexpected_topics_are_dropped(client: Any, topic: str) -> None:
    board, store, events = client
    board.handle(topic, result_payload("1.2.3", "urgent"))
    assert events == [] and store.count() == 0


def test_oversized_or_malformed_messages_are_dropped(client: Any) -> None:
    board, store, events = client
    board.handle(f"{P}/w/b/study/1.2.3", b"{" + b" " * 300_000 + b"}")
    board.handle(f"{P}/w/b/study/1.2.3", b"\xff\xfe")
    board.handle(f"{P}/w/b/status", b"[1, 2]")
    board.handle(f"{P}/w/b/rejected", b"nope")
    board.handle(f"{P}/w/b/ack/1.2.3", b'{"alert_id": 5}')
    assert events == [] and store.count() == 0 and store.boxes() == []


def test_the_will_keeps_what_the_box_said_before(client: Any) -> None:
    board, store, _ = client
    board.handle(f"{P}/w/b/status", json.dumps({"state": "online", "model": "m"}).encode())
    board.handle(f"{P}/w/b/status", b'{"state": "offline"}')
    (box,) = store.boxes()
    assert box["state"] == "offline" and box["model"] == "m"
    board.handle(f"{P}/w/b/status", b"")  # retained status cleared: the box is gone
    assert store.boxes() == []
    board.handle(f"{P}/w/b/status", b'{"state": "<b>weird</b>", "outbox_depth": "9"}')
    (box,) = store.boxes()
    assert box["state"] == "unknown" and box["outbox_depth"] is None


def test_an_ack_topic_is_only_built_from_valid_stored_segments(client: Any) -> None:
    board, _, _ = client
    row = {"site": "w", "device_id": "b/#", "study_instance_uid": "1.2.3"}
    with pytest.raises(ValueError):
        board.publish_ack(row, Ack("a", "alice", "t"))
    row = {"site": "w", "device_id": "b", "study_instance_uid": "1.2.3/../x"}
    with pytest.raises(ValueError):
        board.publish_ack(row, Ack("a", "alice", "t"))
    assert board.publish_ack({**row, "study_instance_uid": "1.2.3"}, Ack("a", "a", "t")) is False


# -- accounts --------------------------------------------------------------------------------


def test_accounts_file_is_private_and_hashed(tmp_path: Path) -> None:
    users = tmp_path / "users"
    assert add_user(users, "alice", "pw one") is False
    assert add_user(users, "bob", "pw two") is False
    assert add_user(users, "alice", "pw three") is True
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    stored = users.read_text()
    # The passwords hold a space, which a base64 salt or hash never does, so a random salt
    # cannot contain one by chance (a bare "pw" did, once in ~500 runs).
    assert not any(pw in stored for pw in ("pw one", "pw two", "pw three"))
    assert set(read_users(users)) == {"alice", "bob"}
    assert check_password(users, "alice", "pw three")
    assert not check_password(users, "alice", "pw one")
    assert not check_password(users, "carol", "pw two")
    assert not check_password(users, "bob:x", "pw two")
    with pytest.raises(ConfigError):
        add_user(users, "eve:admin", "x")
    with pytest.raises(ConfigError):
        add_user(users, "eve", "")


def test_login_limiter_counts_per_key() -> None:
    limiter = LoginLimiter(2)
    limiter.failed("address:a", "user:x")
    assert not limiter.blocked("address:a", "user:y")
    limiter.failed("address:a", "user:y")
    assert limiter.blocked("address:b", "user:x") is False
    assert limiter.blocked("address:a", "user:z"), "two failures from one address"


def cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
    )


def test_add_user_reads_the_password_from_stdin(tmp_path: Path) -> None:
    env = {"EDGE_AGENT_BOARD__USERS_FILE": str(tmp_path / "users"), "PATH": "/usr/bin:/bin"}
    env.update({k: v for k, v in __import__("os").environ.items() if k == "PYTHONPATH"})
    done = cli("board", "add-user", "alice", stdin="s3cret\n", env=env)
    assert done.returncode == 0, done.stderr
    assert check_password(tmp_path / "users", "alice", "s3cret")
    done = cli("board", "add-user", "alice", stdin="\n", env=env)
    assert done.returncode == 2 and "empty" in done.stderr


def test_board_without_its_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from edge_agent import cli as cli_module

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name)
    )
    assert cli_module.main(["board"]) == 3


@pytest.mark.parametrize(
    ("env", "value", "key"),
    [
        ("EDGE_AGENT_BOARD__LISTEN", "localhost:80", "board.listen"),
        ("EDGE_AGENT_BOARD__LISTEN", "127.0.0.1:0", "board.listen"),
        (
            "EDGE_AGENT_BOARD__VIEWER_URL",
            "javascript:alert(1)//{study_instance_uid}",
            "board.viewer_url",
        ),
        ("EDGE_AGENT_BOARD__VIEWER_URL", "https://pacs/{patient_id}", "board.viewer_url"),
        ("EDGE_AGENT_BOARD__VIEWER_URL", "https://pacs/viewer", "board.viewer_url"),
        ("EDGE_AGENT_BOARD__MAX_WAIT_MINUTES", "0", "board.max_wait_minutes"),
        ("EDGE_AGENT_BOARD__AUTH", "none", "board.auth"),
    ],
)
def test_board_config_errors_name_the_key(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, key: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    assert info.value.key == key


# -- proxy authentication --------------------------------------------------------------------


def proxy_board(tmp_path: Path, trusted: list[str]) -> Any:
    from edge_agent.board.server import BoardServer

    settings = load_settings(
        None,
        mqtt={"port": free_port()},  # no broker: the page says so and still serves
        board={
            "listen": f"127.0.0.1:{free_port()}",
            "state_file": tmp_path / "b.sqlite3",
            "users_file": tmp_path / "none",
            "auth": "proxy",
            "trusted_proxies": trusted,
        },
    )
    server = BoardServer(settings)
    server.start_in_thread()
    return server


def test_proxy_header_is_believed_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    server = proxy_board(tmp_path, ["127.0.0.1"])
    try:
        http = Http(server.url.rstrip("/"))
        assert http.request("/")[0] == 403, "no header"
        status, _, body = http.request("/", headers={"X-Remote-User": "dr.house"})
        assert status == 200 and b"dr.house" in body
        assert http.request("/api/state", headers={"X-Remote-User": "dr.house"})[0] == 200
        other = http.request("/api/state", headers={"X-Remote-User": "mallory"})
        assert other[0] == 401, "the session is the proxy user's, not another's"
        assert http.request("/", headers={"X-Remote-User": "<script>"})[0] == 403
        behind_tls = Http(server.url.rstrip("/"))
        status, headers, _ = behind_tls.request(
            "/", headers={"X-Remote-User": "dr.house", "X-Forwarded-Proto": "https"}
        )
        assert status == 200 and "Secure" in headers["set-cookie"]
        assert "Secure" not in http.request("/", headers={"X-Remote-User": "x"})[1].get(
            "set-cookie", ""
        )
    finally:
        server.stop()
    untrusted = proxy_board(tmp_path / "2", ["10.9.9.9"])
    try:
        http = Http(untrusted.url.rstrip("/"))
        assert http.request("/", headers={"X-Remote-User": "dr.house"})[0] == 403
    finally:
        untrusted.stop()


def test_add_user_keeps_the_mode_an_administrator_gave_the_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("")
    users.chmod(0o640)
    add_user(users, "alice", "pw")
    assert stat.S_IMODE(users.stat().st_mode) == 0o640


def test_a_full_worklist_never_leaves_out_an_unacknowledged_urgent_study(tmp_path: Path) -> None:
    store = BoardStore(tmp_path / "b.sqlite3")
    add(store, "1.9", "urgent", complete_at=1000.0)
    for i in range(5):
        add(store, f"1.2.{i}", "routine", score=0.1, complete_at=2000.0 + i)
    shown = [r["study_instance_uid"] for r in store.worklist(0.0, 3)]
    assert shown == ["1.9", "1.2.4", "1.2.3"]
