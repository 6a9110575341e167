"""Reading files from the watch folder as an attacker or a careless writer shapes it: links
and FIFOs swapped in between the watcher's look and the read, links and other non-regular
entries left in the folder, files that cannot be read yet, and the re-reads by the scorer and
the narrative. Real files, real links, real FIFOs, sockets and devices; the real Agent."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import stat
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edge_agent.config import load_settings
from edge_agent.dicom.instance_file import (
    FileChanged,
    FileGone,
    FileProblem,
    NotRegularFile,
    open_instance,
    read_dataset,
    refusal,
)
from edge_agent.errors import ConfigError, InputRejected
from edge_agent.identifiers import file_id
from edge_agent.intake.watcher import ReadyFile
from edge_agent.narrative import NarrativeWorker
from edge_agent.service import Agent
from edge_agent.simulate import FINDINGS, chest_instance, write_instance

LINK = "symbolic link: not followed; copy the file in instead"


def instance(seed: int, folder: Path) -> Path:
    ds = chest_instance(
        np.random.default_rng(seed), findings=dict.fromkeys(FINDINGS, False), rows=96, cols=80
    )
    return write_instance(ds, folder)


def sop_uid(path: Path) -> str:
    return read_dataset(path.parent, path.name, pixels=False).SOPInstanceUID


def in_thread(fn, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a thread; its result, or AssertionError when it is still blocked."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"blocked for more than {timeout:g} s"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def release_fifo(path: Path) -> None:
    """Open a FIFO for writing (non-blocking) so a reader blocked on its open goes on."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


# -- the opener ----------------------------------------------------------------------------


def test_the_opener_reads_a_regular_file_and_refuses_everything_else(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    real = instance(1, outside)
    root = tmp_path / "watch"
    (root / "study").mkdir(parents=True)
    shutil.copyfile(real, root / "study" / "a.dcm")
    os.symlink(real, root / "link.dcm")
    os.symlink(outside, root / "link-dir")
    os.mkfifo(root / "fifo.dcm")
    os.mknod(root / "null.dcm", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.dcm"))
    try:
        assert read_dataset(root, "study/a.dcm").SOPInstanceUID == sop_uid(real)
        refused = {
            "link.dcm": LINK,
            "link-dir/" + real.name: "a folder on its path is a symbolic link: not followed",
            "fifo.dcm": "FIFO: not a regular file",  # and no wait for a writer
            "null.dcm": "device: not a regular file",
            "sock.dcm": "socket: not a regular file",
            "study": "folder: not a regular file",
        }
        for rel, reason in refused.items():
            with pytest.raises(NotRegularFile) as caught:
                in_thread(lambda rel=rel: read_dataset(root, rel))
            assert caught.value.reason == reason, rel
        with pytest.raises(FileGone):
            read_dataset(root, "study/none.dcm")
        with pytest.raises(FileGone):
            read_dataset(root, "../outside/" + real.name)
    finally:
        sock.close()
        release_fifo(root / "fifo.dcm")


def test_the_opener_checks_it_is_the_file_that_was_seen(tmp_path: Path) -> None:
    path = instance(1, tmp_path)
    st = path.stat()
    seen = ReadyFile(path, path.name, st.st_size, st.st_mtime_ns, st.st_ino)
    with open_instance(tmp_path, path.name, seen) as f:
        assert f.read(132)[128:] == b"DICM"
    os.replace(instance(2, tmp_path / "other"), path)  # another file under the name
    with pytest.raises(FileChanged):
        read_dataset(tmp_path, path.name, seen=seen)
    with pytest.raises(InputRejected, match="another instance"):
        read_dataset(tmp_path, path.name, sop_instance_uid="1.2.3")


@pytest.fixture(scope="module")
def maze(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A watch folder with links every way out (and in), beside a folder with a secret."""
    base = tmp_path_factory.mktemp("maze")
    (base / "outside").mkdir()
    (base / "outside" / "secret.dcm").write_bytes(b"secret")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.dcm").write_bytes(b"a")
    (root / "sub" / "b.dcm").write_bytes(b"b")
    os.symlink("..", root / "up")
    os.symlink(base / "outside", root / "out")
    os.symlink(".", root / "self")
    os.symlink(root / "sub", root / "sub" / "again")
    os.symlink(base / "outside" / "secret.dcm", root / "f.dcm")
    return root


SEGMENTS = ["a.dcm", "sub", "b.dcm", "up", "out", "self", "again", "f.dcm", "secret.dcm"]
SEGMENTS += ["..", ".", "", "root", "outside"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5))
def test_the_opener_only_ever_opens_a_file_inside_the_folder(maze: Path, parts: list[str]) -> None:
    path = "/".join(parts)
    assume(not path.startswith("/"))  # absolute: only the receiver's own files are recorded so
    wanted = PurePosixPath(path).parts in (("a.dcm",), ("sub", "b.dcm"))
    try:
        with open_instance(maze, path) as f:
            content = f.read()
    except FileProblem:
        assert not wanted, path
    else:
        assert wanted, path
        assert content in (b"a", b"b")


def test_refusal_reasons_name_the_kind() -> None:
    assert refusal(stat.S_IFREG | 0o644) is None
    assert refusal(stat.S_IFLNK | 0o777) == LINK
    assert refusal(stat.S_IFIFO | 0o644) == "FIFO: not a regular file"


# -- the Agent -----------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = load_settings(
        None,
        watch_dir=watch,
        state_dir=tmp_path / "state",
        profile="x86-cpu",
        intake={"file_stable_seconds": 0, "watch_mode": "polling"},
    )
    made = Agent(settings)
    yield made
    made.store.close()


def files(agent: Agent) -> dict[str, tuple[str, str | None]]:
    with closing(sqlite3.connect(agent.settings.state_dir / "state.sqlite3")) as db:
        return {p: (s, r) for p, s, r in db.execute("SELECT path, status, reason FROM files")}


def rejected_messages(agent: Agent) -> list[bytes]:
    return [m.payload for m in agent.store.outbox_messages() if m.topic.endswith("/rejected")]


class Clock:
    def __init__(self) -> None:
        self.now = 1.0

    def __call__(self, step: float = 1.0) -> float:
        self.now += step
        return self.now


def intake(agent: Agent, clock: Clock) -> list[ReadyFile]:
    ready = agent.watcher.scan(clock())
    for f in ready:
        agent._handle_file(f)
    return ready


def test_a_link_swapped_in_after_the_look_is_not_followed(agent: Agent, tmp_path: Path) -> None:
    watch = agent.settings.watch_dir
    outside = instance(7, tmp_path / "outside")  # a DICOM file outside the folder
    path = instance(8, watch)
    clock = Clock()
    (ready,) = agent.watcher.scan(clock())  # the watcher saw a regular file …
    path.unlink()
    os.symlink(outside, path)  # … and a link to the outside file took its place
    agent._handle_file(ready)
    assert agent.store.counters()["instances"] == 0, "the link was followed"
    # the next look sees the link for what it is and reports it, once
    intake(agent, clock)
    assert files(agent) == {path.name: ("rejected", LINK)}
    assert len(rejected_messages(agent)) == 1
    assert intake(agent, clock) == [] and len(rejected_messages(agent)) == 1


def test_a_fifo_swapped_in_after_the_look_never_blocks_the_intake(
    agent: Agent, tmp_path: Path
) -> None:
    path = instance(8, agent.settings.watch_dir)
    clock = Clock()
    (ready,) = agent.watcher.scan(clock())
    path.unlink()
    os.mkfifo(path)  # nobody will ever write to it
    try:
        in_thread(lambda: agent._handle_file(ready))  # returns at once
        intake(agent, clock)
        assert files(agent) == {path.name: ("rejected", "FIFO: not a regular file")}
    finally:
        release_fifo(path)


def test_links_fifos_sockets_and_devices_are_reported_once_and_never_read(
    agent: Agent, tmp_path: Path
) -> None:
    watch = agent.settings.watch_dir
    outside = tmp_path / "outside"
    target = instance(3, outside)
    os.symlink(target, watch / "link.dcm")
    os.symlink(outside, watch / "linked study")  # a link to a folder: not walked
    os.symlink(watch / "nowhere", watch / "dangling.dcm")
    (watch / "sub").mkdir()
    os.mkfifo(watch / "sub" / "pipe.dcm")
    os.mknod(watch / "zero.dcm", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(watch / "sock"))
    clock = Clock()
    try:
        in_thread(lambda: intake(agent, clock))
        assert files(agent) == {
            "link.dcm": ("rejected", LINK),
            "linked study": ("rejected", LINK),
            "dangling.dcm": ("rejected", LINK),
            "sub/pipe.dcm": ("rejected", "FIFO: not a regular file"),
            "zero.dcm": ("rejected", "device: not a regular file"),
            "sock": ("rejected", "socket: not a regular file"),
        }
        assert agent.store.counters()["instances"] == 0
        assert len(rejected_messages(agent)) == 6
        # named by file id (paths go out only with phi.publish_paths)
        sent = b"".join(rejected_messages(agent))
        assert f'"file_id":"{file_id(agent._file_id_key, "sub/pipe.dcm")}"'.encode() in sent
        assert b'"path"' not in sent
        # unchanged: not reported again, neither by this agent nor after a restart
        assert in_thread(lambda: intake(agent, clock)) == []
        agent.store.close()
        again, clock = Agent(agent.settings), Clock()
        try:
            assert in_thread(lambda: intake(again, clock)) == []
            assert len(rejected_messages(again)) == 6
            # a link pointed elsewhere is another entry: reported again
            (watch / "link.dcm").unlink()
            os.symlink(outside, watch / "link.dcm")
            assert [f.relpath for f in intake(again, clock)] == ["link.dcm"]
            assert len(rejected_messages(again)) == 7
        finally:
            again.store.close()
    finally:
        sock.close()
        release_fifo(watch / "sub" / "pipe.dcm")


def test_the_scorer_and_the_narrative_do_not_follow_a_link_swapped_in_later(
    agent: Agent, tmp_path: Path
) -> None:
    watch = agent.settings.watch_dir
    path = instance(4, watch)
    intake(agent, Clock())
    (row,) = [r for uid in agent.store.studies_in_state("open") for r in agent.store.instances(uid)]
    assert agent.scorer._read(row).SOPInstanceUID == row.sop_instance_uid
    # the same instance, outside the folder, linked in under the scored name
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(path, outside / "same.dcm")
    path.unlink()
    os.symlink(outside / "same.dcm", path)
    with pytest.raises(InputRejected) as caught:
        agent.scorer._read(row)
    assert caught.value.reason == LINK
    worker = NarrativeWorker(
        agent.store,
        agent.bundle,
        watch_dir=watch,
        providers=["CPUExecutionProvider"],
        threads=1,
        max_new_tokens=1,
        scoring_idle=threading.Event(),
        stop=threading.Event(),
        topic=str,
        published=lambda: None,
    )
    with pytest.raises(InputRejected) as caught:
        worker._read(row.path, row.sop_instance_uid)
    assert caught.value.reason == LINK
    # a FIFO there: refused at once, no wait for a writer
    path.unlink()
    os.mkfifo(path)
    try:
        with pytest.raises(InputRejected, match="FIFO"):
            in_thread(lambda: agent.scorer._read(row))
        with pytest.raises(InputRejected, match="FIFO"):
            in_thread(lambda: worker._read(row.path, row.sop_instance_uid))
    finally:
        release_fifo(path)


def test_a_file_that_could_not_be_read_is_handed_out_again_with_back_off(agent: Agent) -> None:
    """The schedule (1 s, doubling); the read error itself is made for real through the
    daemon in test_unreadable_file_is_retried_until_it_can_be_read."""
    path = instance(5, agent.settings.watch_dir)
    clock = Clock()
    (ready,) = agent.watcher.scan(clock())
    assert agent.watcher.retry_later(ready, clock.now) == 1
    assert agent.status_fields()["read_retries"] == 1
    assert agent.watcher.scan(clock(0.5)) == []  # 0.5 s < 1 s
    (ready,) = agent.watcher.scan(clock(0.6))
    assert agent.watcher.retry_later(ready, clock.now) == 2
    assert agent.watcher.scan(clock(1.5)) == []  # 1.5 s < 2 s
    (ready,) = agent.watcher.scan(clock(0.6))
    assert ready.relpath == path.name
    agent._handle_file(ready)
    assert agent.store.counters()["instances"] == 1
    assert agent.status_fields()["read_retries"] == 0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[intake]\nstall_seconds = 0\n", "intake.stall_seconds"),
        ("[intake]\nretry_max_seconds = 0.5\n", "intake.retry_max_seconds"),
        ("[intake]\nretry_max_seconds = 7200\n", "intake.retry_max_seconds"),
    ],
)
def test_intake_read_settings_out_of_bounds_name_their_key(
    tmp_path: Path, text: str, key: str
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert info.value.key == key
