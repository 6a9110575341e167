"""The one UID rule and the one topic-segment rule (edge_agent/identifiers.py), by property,
and where they are applied: the folder reader on real files, config validation through the
command line, topics built by the agent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edge_agent.config import load_settings
from edge_agent.dicom.uid import UID_MAX_LENGTH, uid_problem, valid_uid
from edge_agent.errors import ConfigError, InputRejected
from edge_agent.identifiers import (
    file_id,
    is_file_id,
    topic,
    topic_prefix,
    topic_segment,
)
from edge_agent.intake.header import read_header
from edge_agent.simulate import simulate

DIGITS = "0123456789"
component = st.text(alphabet=DIGITS, min_size=1, max_size=8)  # leading zeros included
uids = (
    st.lists(component, min_size=1, max_size=10)
    .map(".".join)
    .filter(lambda u: len(u) <= UID_MAX_LENGTH)
)
padding = st.text(alphabet=" \0", max_size=3)
controls = st.sampled_from([chr(c) for c in range(0x20)] + ["\x7f"])


# -- the UID rule, by property -------------------------------------------------------------


@given(uids, padding, padding)
@example("1.2.03.0004", "", "\0")  # leading zeros, as real scanners write them
def test_a_uid_with_padding_is_that_uid(uid: str, before: str, after: str) -> None:
    assert valid_uid(before + uid + after) == uid
    assert uid_problem(before + uid + after) is None


@given(uids, st.integers(min_value=0, max_value=64), controls, padding)
@example("1.2.3", 5, "\n", "")  # re.match(r"...$") accepted this one
@example("1.2.3", 5, "\n", "\0")  # pydicom's reading of raw b"1.2.3\n\x00\x0b"
@example("1.2.3", 5, "\t", "")
def test_a_control_character_anywhere_is_malformed(
    uid: str, at: int, control: str, after: str
) -> None:
    at = min(at, len(uid))
    value = uid[:at] + control + uid[at:] + after
    if control == "\0" and at in (0, len(uid)):
        return  # a NUL at either end is padding
    assert valid_uid(value) is None
    assert uid_problem(value) is not None


@given(st.text(max_size=80))
def test_whatever_passes_is_digits_and_dots_within_64(text: str) -> None:
    uid = valid_uid(text)
    if uid is None:
        assert uid_problem(text) is not None
        return
    assert 1 <= len(uid) <= UID_MAX_LENGTH
    assert set(uid) <= set(DIGITS + ".")
    assert "" not in uid.split(".")
    assert valid_uid(uid) == uid  # idempotent: a checked UID passes as is


@given(uids.filter(lambda u: len(u) <= UID_MAX_LENGTH - 2))
def test_an_empty_component_is_malformed(uid: str) -> None:
    for bad in ("." + uid, uid + ".", uid.replace(".", "..", 1) if "." in uid else uid + "..1"):
        assert valid_uid(bad) is None
        assert uid_problem(bad) == "has an empty component"


def test_length_and_reasons_never_quote_the_value() -> None:
    assert valid_uid("1." * 31 + "12") is not None  # 64 characters
    assert uid_problem("1." * 32 + "1") == "longer than 64 characters"
    assert uid_problem(None) == "missing"
    assert uid_problem(" \0") == "empty"
    for value in ("DOE^JANE", "1.2.3\nDOE", "１.２", "1.2.3e4"):
        problem = uid_problem(value)
        assert problem is not None and "DOE" not in problem


# -- the topic-segment rule ------------------------------------------------------------------

segments = st.text(alphabet="ABCXYZabcxyz0123456789_-", min_size=1, max_size=20)


@given(segments)
def test_segments_pass_and_any_other_character_fails(segment: str) -> None:
    assert topic_segment(segment) == segment
    for bad in ("/", "+", "#", "\0", "\n", "\x1b", " ", ".", "é"):
        with pytest.raises(ValueError):
            topic_segment(segment + bad)


@given(st.lists(segments, min_size=1, max_size=4).map("/".join), uids)
def test_topics_are_checked_segments_and_uids(prefix: str, uid: str) -> None:
    assert topic_prefix(prefix) == prefix
    assert topic(prefix, "study", uid) == f"{prefix}/study/{uid}"
    for bad in (uid + "\n", uid + " ", uid + "/x", "+", "#", "a\x00b", ""):
        with pytest.raises(ValueError):
            topic(prefix, "study", bad)
    for bad_prefix in (f"/{prefix}", f"{prefix}/", f"{prefix}//x", f"{prefix}\x01", "a/#"):
        with pytest.raises(ValueError):
            topic_prefix(bad_prefix)


def test_file_ids_are_keyed_and_stable() -> None:
    key, other = b"k" * 32, b"o" * 32
    a = file_id(key, "DOE^JANE 19700101/1.dcm")
    assert is_file_id(a) and a == file_id(key, "DOE^JANE 19700101/1.dcm")
    assert a != file_id(other, "DOE^JANE 19700101/1.dcm")
    assert a != file_id(key, "DOE^JANE 19700101/2.dcm")
    assert file_id(key, "bad \udcff name")  # a name that is not UTF-8 still has an id


# -- where the rules are applied --------------------------------------------------------------


def raw_uid_file(folder: Path, keyword: str, raw: bytes) -> Path:
    """A simulated radiograph whose ``keyword`` holds exactly the bytes ``raw`` (written as a
    placeholder of the same length, then replaced: pydicom refuses to write such a value)."""
    (study,) = simulate(folder, studies=1, seed=3, rows=64, cols=64)
    path = study.paths[0]
    ds = pydicom.dcmread(path)
    placeholder = ("9." * len(raw))[: len(raw) - 1] + "9"
    setattr(ds, keyword, placeholder)
    ds.save_as(path)
    data = path.read_bytes()
    assert data.count(placeholder.encode()) == 1
    path.write_bytes(data.replace(placeholder.encode(), raw))
    return path


@pytest.mark.parametrize(
    ("keyword", "raw"),
    [
        ("StudyInstanceUID", b"1.2.3\n\x00\x0b"),  # read back by pydicom as '1.2.3\n\x00'
        ("StudyInstanceUID", b"1.2\t.3"),
        ("SOPInstanceUID", b"1.2\n.3\x00\x00"),
        ("SeriesInstanceUID", b"1.2\x1b[31m"),
        ("SOPClassUID", b"1.2.8\n40"),
    ],
)
def test_the_folder_reader_rejects_control_characters_in_uids(
    tmp_path: Path, keyword: str, raw: bytes
) -> None:
    path = raw_uid_file(tmp_path, keyword, raw)
    with pytest.raises(InputRejected) as info:
        read_header(path)
    assert info.value.reason == f"malformed {keyword} (holds a control character)"


@pytest.mark.parametrize("raw", [b"1.2.03.4 ", b"1.2.03.4\x00", b"1.2.03.4\t\n"])
def test_the_folder_reader_takes_padded_uids_and_leading_zeros(tmp_path: Path, raw: bytes) -> None:
    # pydicom removes trailing whitespace of a UI value (and one NUL) before we see it: what
    # it reads is a clean UID, and that is what is checked
    path = raw_uid_file(tmp_path, "StudyInstanceUID", raw)
    assert read_header(path).study_instance_uid == "1.2.03.4"


@pytest.mark.parametrize(
    ("key", "env", "value"),
    [
        ("mqtt.topic_prefix", "EDGE_AGENT_MQTT__TOPIC_PREFIX", "edge-triage/v1\x01"),
        ("mqtt.topic_prefix", "EDGE_AGENT_MQTT__TOPIC_PREFIX", "edge triage/v1"),
        ("mqtt.topic_prefix", "EDGE_AGENT_MQTT__TOPIC_PREFIX", "edge-triage//v1"),
        ("site", "EDGE_AGENT_SITE", "north\n"),
        ("device_id", "EDGE_AGENT_DEVICE_ID", "box/1"),
    ],
)
def test_config_refuses_bad_topic_segments_naming_the_key(
    tmp_path: Path, key: str, env: str, value: str
) -> None:
    section, _, name = key.rpartition(".")
    with pytest.raises(ConfigError) as info:
        load_settings(None, **({section: {name: value}} if section else {name: value}))
    assert info.value.key == key
    # the command line: one line naming the key, exit 2
    run = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "status"],
        env={**os.environ, env: value, "EDGE_AGENT_STATE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith(f"edge-agent: config error: {key}:"), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_the_agent_builds_only_checked_topics(tmp_path: Path) -> None:
    from edge_agent.service import Agent

    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = load_settings(
        None, watch_dir=watch, state_dir=tmp_path / "state", profile="x86-cpu", site="north"
    )
    agent = Agent(settings)
    try:
        assert agent._topic("study", "1.2.3") == "edge-triage/v1/north/box/study/1.2.3"
        assert agent._topic("rejected") == "edge-triage/v1/north/box/rejected"
        for bad in ("1.2.3\n", "1.2.3\x00", "1.2/3", "#"):
            with pytest.raises(ValueError):
                agent._topic("study", bad)
    finally:
        agent.store.close()


def test_a_malformed_uid_recorded_by_an_earlier_version_is_not_scored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The old check stored '1.2.3\\n' as a StudyInstanceUID; after an upgrade that study is
    refused in one line instead of failing with a traceback at the topic."""
    import logging

    from edge_agent.service import Agent
    from edge_agent.store import InstanceRecord, Store

    watch = tmp_path / "incoming"
    watch.mkdir()
    old = Store(tmp_path / "state" / "state.sqlite3")
    record = InstanceRecord("1.2.3.1", "1.2.3\n", None, "CR", "frontal")  # type: ignore[arg-type]
    old.add_instance("a.dcm", 1, 1, record, now=1.0)
    assert old.complete_quiet_studies(1.0, now=10.0) == ["1.2.3\n"]
    old.close()
    settings = load_settings(None, watch_dir=watch, state_dir=tmp_path / "state", profile="x86-cpu")
    agent = Agent(settings)
    try:
        with caplog.at_level(logging.INFO, logger="edge_agent"):
            agent._score_one("1.2.3\n")
        assert not any(r.exc_info for r in caplog.records)
        assert "malformed StudyInstanceUID (holds a control character): not scored" in caplog.text
        assert agent.store.outbox_depth() == 0
    finally:
        agent.store.close()
