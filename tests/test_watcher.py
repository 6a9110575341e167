"""The watch folder as scanners really fill it: slow writers, duplicates, files replaced in
place, symbolic links, odd names, nested study folders, thousands of files at once; inotify
and polling, and how ``auto`` chooses between them."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from watchdog.events import EventsLostEvent, FileCreatedEvent

from edge_agent.config import load_settings
from edge_agent.errors import ConfigError
from edge_agent.intake.watcher import (
    FolderWatcher,
    ReadyFile,
    WatchMode,
    choose_mode,
    is_network_filesystem,
    mount_of,
)
from edge_agent.simulate import FINDINGS, chest_instance, write_instance

SUFFIXES = (".part", ".tmp")
MODES = ["polling", "inotify"]


@pytest.fixture
def watchers() -> Iterator[list[FolderWatcher]]:
    made: list[FolderWatcher] = []
    yield made
    for w in made:
        w.close()


def started(
    made: list[FolderWatcher],
    root: Path,
    mode: WatchMode,
    *,
    stable: float = 0.0,
    poll: float = 0.2,
    rescan: float = 60.0,
    batch: int = 64,
) -> FolderWatcher:
    w = FolderWatcher(
        root,
        stable_seconds=stable,
        ignore_suffixes=SUFFIXES,
        watch_mode=mode,
        poll_interval=poll,
        rescan_seconds=rescan,
        batch_size=batch,
    )
    made.append(w)
    assert w.start() == mode, w.mode_reason
    return w


def collect(w: FolderWatcher, seconds: float, poll: float = 0.2) -> list[ReadyFile]:
    """Run the daemon's loop for ``seconds``: scan, hand out, mark handled, wait."""
    out: list[ReadyFile] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for f in w.scan(time.monotonic()):
            out.append(f)
            w.mark_handled(f)
        if not w.more_ready:
            w.wait(min(poll, max(0.0, deadline - time.monotonic())))
    return out


def until(w: FolderWatcher, want: int, timeout: float = 10.0) -> list[ReadyFile]:
    out: list[ReadyFile] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out += collect(w, 0.3)
    return out


# -- slow writers --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_slow_writer_that_never_renames_is_read_only_when_complete(
    tmp_path: Path, mode: WatchMode, watchers: list[FolderWatcher]
) -> None:
    w = started(watchers, tmp_path, mode, stable=1.5)
    path = tmp_path / "IM0001"  # written in place under its final name, over ~3 s
    done = threading.Event()
    chunks = 15

    def writer() -> None:
        with path.open("wb") as f:
            for _ in range(chunks):
                f.write(b"x" * 4096)
                f.flush()
                time.sleep(0.2)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[tuple[ReadyFile, bool]] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (done.is_set() and seen):
        for f in w.scan(time.monotonic()):
            seen.append((f, done.is_set()))
            w.mark_handled(f)
        w.wait(0.2)
    thread.join()
    assert seen, "the file was never handed out"
    (f, finished), *more = seen
    assert finished, "handed out while the writer was still appending"
    assert f.size == chunks * 4096 and not more


# -- duplicates and files replaced in place ------------------------------------------------


def test_replaced_in_place_with_the_same_size_and_mtime_is_noticed_by_its_inode(
    tmp_path: Path, watchers: list[FolderWatcher]
) -> None:
    f = tmp_path / "a.dcm"
    f.write_bytes(b"first")
    w = started(watchers, tmp_path, "polling", poll=0.0)
    (ready,) = w.scan(1.0)
    w.mark_handled(ready)
    assert w.scan(2.0) == []
    st = f.stat()
    new = tmp_path / "new.tmp"  # rsync -t: another file, same size, same mtime, renamed over
    new.write_bytes(b"other")
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, f)
    (again,) = w.scan(3.0)
    assert again.relpath == "a.dcm" and again.ino != ready.ino


def _instance(seed: int, folder: Path) -> Path:
    ds = chest_instance(
        np.random.default_rng(seed), findings=dict.fromkeys(FINDINGS, False), rows=96, cols=80
    )
    return write_instance(ds, folder)


def test_duplicates_count_once_and_replaced_files_are_read_again(tmp_path: Path) -> None:
    from edge_agent.service import Agent

    watch, elsewhere = tmp_path / "incoming", tmp_path / "elsewhere"
    watch.mkdir()
    settings = load_settings(
        None,
        watch_dir=watch,
        state_dir=tmp_path / "state",
        profile="x86-cpu",
        intake={"file_stable_seconds": 0, "watch_mode": "polling"},
    )
    agent = Agent(settings)
    clock = iter(range(1, 1000))

    def intake() -> None:
        for f in agent.watcher.scan(float(next(clock))):
            agent._handle_file(f)

    def files() -> dict[str, str]:
        with closing(sqlite3.connect(tmp_path / "state" / "state.sqlite3")) as db:
            return dict(db.execute("SELECT path, status FROM files"))

    try:
        first = _instance(1, watch)
        intake()
        assert agent.store.counters()["instances"] == 1
        # the same instance again under another name (a PACS sending twice): once
        shutil.copyfile(first, watch / "copy of it.dcm")
        intake()
        assert files() == {first.name: "accepted", "copy of it.dcm": "duplicate"}
        # rewritten in place with the same instance (new mtime): read again, still that
        # instance's own file, so still accepted (not a duplicate of itself)
        time.sleep(0.01)
        first.write_bytes(first.read_bytes())
        intake()
        assert agent.store.counters()["instances"] == 1
        assert files()[first.name] == "accepted"
        # replaced in place by another instance: a new one
        other = _instance(2, elsewhere)
        os.replace(other, first)
        intake()
        assert agent.store.counters()["instances"] == 2
        assert files()[first.name] == "accepted"
        intake()  # nothing changed: nothing read
        assert agent.store.counters()["instances"] == 2
    finally:
        agent.store.close()


# -- symbolic links ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_symlinks_are_never_followed(
    tmp_path: Path, mode: WatchMode, watchers: list[FolderWatcher]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.dcm").write_bytes(b"x")
    root = tmp_path / "watch"
    (root / "study").mkdir(parents=True)
    (root / "study" / "real.dcm").write_bytes(b"x")
    w = started(watchers, root, mode)
    os.symlink(outside, root / "link-dir")
    os.symlink(outside / "secret.dcm", root / "link.dcm")
    os.symlink(root / "study", root / "inside-link")  # links inside are not followed either
    (outside / "later.dcm").write_bytes(b"x")
    # an event naming a path through the link (as a watch that followed it would report)
    w._on_event(FileCreatedEvent(str(root / "link-dir" / "later.dcm")))
    w._on_event(FileCreatedEvent(str(root / "inside-link" / "real.dcm")))
    got = {f.relpath: f.refused for f in collect(w, 1.0)}
    # the links themselves are handed out once, to be reported, never what they point to
    link = "symbolic link: not followed; copy the file in instead"
    assert got == {"study/real.dcm": None, "link-dir": link, "link.dcm": link, "inside-link": link}
    w._last_walk = None  # and a full walk agrees: nothing new, nothing through a link
    assert {f.relpath for f in w.scan(time.monotonic())} == set()


def test_a_folder_swapped_for_a_link_while_a_file_waits_is_not_read_through(
    tmp_path: Path, watchers: list[FolderWatcher]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.dcm").write_bytes(b"outside")
    root = tmp_path / "watch"
    (root / "study").mkdir(parents=True)
    w = started(watchers, root, "inotify", stable=0.5)
    (root / "study" / "a.dcm").write_bytes(b"inside")
    collect(w, 0.3)  # seen, not yet stable
    assert w.waiting == 1
    os.rename(root / "study", root / ".moved-away")
    os.symlink(outside, root / "study")  # the same path now leads outside
    got = {f.relpath: f.refused for f in collect(w, 1.5)}
    assert got == {"study": "symbolic link: not followed; copy the file in instead"}


# -- names and folders ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_spaces_non_ascii_and_nested_study_folders(
    tmp_path: Path, mode: WatchMode, watchers: list[FolderWatcher]
) -> None:
    w = started(watchers, tmp_path, mode)
    names = [
        "IM 0001",
        "Ünïcødé série/IM 0002.dcm",
        "患者/研究 1/画像.dcm",
        "PACS EXPORT/1.2.3/1.2.3.4/1.2.3.4.5.dcm",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * 10)
    got = until(w, len(names))
    assert sorted(f.relpath for f in got) == sorted(names)
    assert all(f.path == tmp_path / f.relpath and f.path.exists() for f in got)


def test_a_name_that_is_not_utf8_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, watchers: list[FolderWatcher]
) -> None:
    fd = os.open(os.fsencode(tmp_path) + b"/s\xe9rie.dcm", os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    (tmp_path / "ok.dcm").write_bytes(b"x")
    w = started(watchers, tmp_path, "polling", poll=0.0)
    with caplog.at_level(logging.WARNING, "edge_agent.intake.watcher"):
        assert [f.relpath for f in w.scan(1.0)] == ["ok.dcm"]
        w.scan(2.0)
    warnings = [r for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(warnings) == 1 and "s\\xe9rie.dcm" in warnings[0].getMessage()


@pytest.mark.parametrize("mode", MODES)
def test_a_study_folder_moved_in_at_once(
    tmp_path: Path, mode: WatchMode, watchers: list[FolderWatcher]
) -> None:
    root, staging = tmp_path / "watch", tmp_path / "staging"
    root.mkdir()
    study = staging / "STUDY 7" / "SERIES 2"
    study.mkdir(parents=True)
    for i in range(50):
        (study / f"IM{i:04d}").write_bytes(b"x")
    w = started(watchers, root, mode)
    collect(w, 0.3)
    os.rename(staging / "STUDY 7", root / "STUDY 7")
    got = until(w, 50)
    assert sorted(f.relpath for f in got) == [f"STUDY 7/SERIES 2/IM{i:04d}" for i in range(50)]


# -- thousands at once ---------------------------------------------------------------------


def test_thousands_of_files_come_out_in_steady_batches(
    tmp_path: Path, watchers: list[FolderWatcher]
) -> None:
    for s in range(20):
        folder = tmp_path / f"study {s}"
        folder.mkdir()
        for i in range(100):
            (folder / f"{i}.dcm").write_bytes(b"x")
    w = started(watchers, tmp_path, "polling", poll=1.0, batch=64)
    batches: list[int] = []
    seen: set[str] = set()
    now = 10.0
    while True:
        ready = w.scan(now)
        if not ready:
            break
        batches.append(len(ready))
        for f in ready:
            assert f.relpath not in seen
            seen.add(f.relpath)
            w.mark_handled(f)
        now += 0.001  # the loop scans again at once while more are ready
    assert len(seen) == 2000 and max(batches) == 64 and len(batches) == 32
    assert w.waiting == 0


def test_a_file_handed_out_but_not_handled_goes_to_the_back(
    tmp_path: Path, watchers: list[FolderWatcher]
) -> None:
    for i in range(5):
        (tmp_path / f"{i}.dcm").write_bytes(b"x")
    w = started(watchers, tmp_path, "polling", poll=0.0, batch=2)
    first = w.scan(1.0)
    w.mark_handled(first[1])  # first[0] failed (its step raised): it must not block the rest
    order = [f.relpath for f in w.scan(2.0)] + [f.relpath for f in w.scan(3.0)]
    assert first[0].relpath not in order[:2]


# -- inotify: events wake the scan, full rescans catch what events miss --------------------


def test_inotify_finds_a_new_file_without_waiting_for_the_poll(
    tmp_path: Path, watchers: list[FolderWatcher]
) -> None:
    w = started(watchers, tmp_path, "inotify", poll=30.0)
    w.scan(time.monotonic())
    start = time.monotonic()
    (tmp_path / "a.dcm").write_bytes(b"x")
    w.wait(30.0)  # an event ends the wait
    (ready,) = w.scan(time.monotonic())
    assert ready.relpath == "a.dcm" and time.monotonic() - start < 5.0


def test_polling_waits_for_its_interval(tmp_path: Path, watchers: list[FolderWatcher]) -> None:
    w = started(watchers, tmp_path, "polling", poll=0.5)
    w.scan(time.monotonic())
    (tmp_path / "a.dcm").write_bytes(b"x")
    start = time.monotonic()
    w.wait(0.5)
    assert time.monotonic() - start >= 0.4
    assert [f.relpath for f in w.scan(time.monotonic())] == ["a.dcm"]


def test_a_missed_event_is_caught_by_the_full_rescan(
    tmp_path: Path, watchers: list[FolderWatcher]
) -> None:
    w = started(watchers, tmp_path, "inotify", rescan=60.0)
    assert w.scan(0.0) == []
    (tmp_path / "a.dcm").write_bytes(b"x")
    deadline = time.monotonic() + 5
    while not w._changed and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # the events that follow (modify, close) have arrived too
    with w._lock:
        w._changed.clear()  # the events are lost
    assert w.scan(1.0) == []
    assert [f.relpath for f in w.scan(61.0)] == ["a.dcm"]


def test_lost_events_make_the_next_scan_walk_the_tree(
    tmp_path: Path, watchers: list[FolderWatcher]
) -> None:
    w = started(watchers, tmp_path, "inotify")
    assert w.scan(0.0) == []
    w.close()  # no more events arrive; pretend the kernel queue overflowed
    (tmp_path / "a.dcm").write_bytes(b"x")
    w._on_event(EventsLostEvent(str(tmp_path), is_directory=True))
    w.poll_interval = 3600.0
    assert [f.relpath for f in w.scan(1.0)] == ["a.dcm"]


# -- choosing the mode ---------------------------------------------------------------------


def mounts(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mounts"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/dev/sda2 /srv ext4 rw,relatime 0 0", "inotify"),
        ("fileserver:/export/pacs /srv/pacs nfs4 rw,vers=4.2 0 0", "polling"),
        ("//nas/modality /srv/pacs cifs rw,vers=3.0 0 0", "polling"),
        ("user@host:/data /srv/pacs fuse.sshfs rw,nosuid 0 0", "polling"),
        ("/dev/sdb1 /srv/pacs\\040share xfs rw 0 0", "polling-fallthrough"),
    ],
)
def test_auto_picks_polling_on_network_filesystems(
    tmp_path: Path, line: str, expected: str
) -> None:
    table = mounts(tmp_path, "/dev/vda / ext4 rw 0 0", line)
    mode, why = choose_mode("auto", Path("/srv/pacs/incoming"), table)
    if expected == "polling-fallthrough":  # "/srv/pacs share" is another folder
        assert mode == "inotify" and "ext4 mounted at /" in why
    else:
        assert mode == expected
        assert line.split()[2] in why


def test_mount_table_details(tmp_path: Path) -> None:
    table = mounts(
        tmp_path,
        "/dev/vda / ext4 rw 0 0",
        "//nas/x /srv/pacs\\040share cifs rw 0 0",
        "tmpfs /srv/pacs\\040share/tmp tmpfs rw 0 0",
    )
    m = mount_of(Path("/srv/pacs share/in"), table)
    assert m is not None and (m.mount_point, m.fstype) == ("/srv/pacs share", "cifs")
    m = mount_of(Path("/srv/pacs share/tmp/x"), table)
    assert m is not None and m.fstype == "tmpfs"
    assert mount_of(Path("/x"), tmp_path / "absent") is None
    mode, why = choose_mode("auto", Path("/x"), tmp_path / "absent")
    assert mode == "inotify" and "unknown" in why
    assert is_network_filesystem("fuse.gvfsd-fuse") and not is_network_filesystem("btrfs")
    assert choose_mode("polling", Path("/x"), table)[0] == "polling"
    assert choose_mode("inotify", Path("/srv/pacs share/in"), table)[0] == "inotify"


def test_auto_on_this_machine_uses_inotify(tmp_path: Path, watchers: list[FolderWatcher]) -> None:
    w = started(watchers, tmp_path, "inotify")
    w.close()
    auto = FolderWatcher(tmp_path, stable_seconds=0, ignore_suffixes=SUFFIXES, watch_mode="auto")
    watchers.append(auto)
    assert auto.start() == "inotify", auto.mode_reason


def test_inotify_that_cannot_start_falls_back_to_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from watchdog.observers.inotify import InotifyObserver

    def refuse(self: InotifyObserver) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(InotifyObserver, "start", refuse)
    for requested in ("auto", "inotify"):
        w = FolderWatcher(
            tmp_path, stable_seconds=0, ignore_suffixes=SUFFIXES, watch_mode=requested
        )
        with caplog.at_level(logging.INFO, "edge_agent.intake.watcher"):
            assert w.start() == "polling"
        assert "inotify could not start: inotify watch limit reached" in w.mode_reason
        (tmp_path / f"{requested}.dcm").write_bytes(b"x")
        assert f"{requested}.dcm" in {f.relpath for f in w.scan(1.0)}
        w.close()
    assert any("polling" in r.getMessage() for r in caplog.records)


def test_a_folder_that_cannot_be_watched_later_switches_to_polling(
    tmp_path: Path, watchers: list[FolderWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    w = started(watchers, tmp_path, "inotify")
    w.scan(0.0)
    # what watchdog logs when inotify_add_watch fails for a new sub-folder (ENOSPC)
    logging.getLogger("watchdog.observers.inotify").warning(
        "Unable to watch %r: %s", b"/x", "No space left on device"
    )
    (tmp_path / "a.dcm").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, "edge_agent.intake.watcher"):
        ready = w.scan(1.0)
    assert w.mode == "polling" and "watch limit" in w.mode_reason
    assert [f.relpath for f in ready] == ["a.dcm"]
    assert w._observer is None


def test_watch_mode_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(None).intake.watch_mode == "auto"
    monkeypatch.setenv("EDGE_AGENT_INTAKE__WATCH_MODE", "polling")
    assert load_settings(None).intake.watch_mode == "polling"
    monkeypatch.setenv("EDGE_AGENT_INTAKE__WATCH_MODE", "nfs")
    with pytest.raises(ConfigError, match=r"intake\.watch_mode"):
        load_settings(None)


def test_the_agent_names_an_unusable_name_by_its_id_not_its_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Folders are often named after the patient: the watcher's own warnings name what is
    below the watch folder the way the agent asks (by file id unless phi.publish_paths)."""
    folder = tmp_path / "DOE^JANE 19700101"
    folder.mkdir()
    fd = os.open(os.fsencode(folder) + b"/s\xe9rie.dcm", os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    w = FolderWatcher(
        tmp_path, stable_seconds=0, ignore_suffixes=(), shown=lambda rel: "file 0123abcd"
    )
    with caplog.at_level(logging.WARNING, "edge_agent.intake.watcher"):
        assert w.scan(1.0) == []
    text = caplog.text
    assert "file 0123abcd" in text and "not valid UTF-8" in text
    assert "DOE" not in text and "rie.dcm" not in text
