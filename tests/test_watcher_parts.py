"""The watcher's parts on their own (edge_agent/intake/watcher/): the per-file memory
(FileStates), the walk (FolderTree) and the inotify notes (InotifyWatch). The watcher as a
whole, with real writers and a real inotify, is tests/test_watcher.py."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from watchdog.events import DirCreatedEvent, FileCreatedEvent, FileMovedEvent

from edge_agent.intake.watcher import inotify
from edge_agent.intake.watcher.inotify import InotifyWatch
from edge_agent.intake.watcher.stability import FileStates
from edge_agent.intake.watcher.tree import FolderTree, ReadyFile, still_same


def test_a_file_is_due_once_stable_and_a_change_restarts_the_wait(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"x")
    files = FileStates(None, stable_seconds=2.0)
    files.observe("a.dcm", os.lstat(path), now=10.0)
    assert not files.due("a.dcm", 11.9) and files.due("a.dcm", 12.0)
    assert files.next_due() == 12.0
    path.write_bytes(b"xy")  # grew: seen anew
    files.observe("a.dcm", os.lstat(path), now=11.0)
    assert not files.due("a.dcm", 12.0) and files.due("a.dcm", 13.0)
    ready = files.hand_out(tmp_path, "a.dcm")
    assert (ready.relpath, ready.size, ready.refused) == ("a.dcm", 2, None)
    files.mark_handled(ready)
    files.observe("a.dcm", os.lstat(path), now=20.0)  # handled as it is: not pending again
    assert files.pending == {} and still_same(ready)


def test_a_file_handed_out_goes_to_the_back_and_retries_back_off(tmp_path: Path) -> None:
    files = FileStates(None, stable_seconds=0.0)
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"x")
        files.observe(name, os.lstat(tmp_path / name), now=0.0)
    first = files.hand_out(tmp_path, "a")
    assert list(files.pending) == ["b", "a"]
    attempts = [files.retry_later(first, 100.0, 1.0, 5.0) for _ in range(5)]
    assert attempts == [1, 2, 3, 4, 5]
    assert files.retry["a"] == (5, 105.0)  # 1, 2, 4, then capped at 5 s
    assert not files.due("a", 104.9) and files.due("a", 105.0)


def test_a_walk_forgets_what_is_gone_but_handled_only_when_complete(tmp_path: Path) -> None:
    files = FileStates({"old.dcm": (1, 1)}, stable_seconds=0.0)
    (tmp_path / "new.dcm").write_bytes(b"x")
    files.observe("new.dcm", os.lstat(tmp_path / "new.dcm"), now=0.0)
    files.keep_only(set(), complete=False)  # a folder could not be listed: keep the memory
    assert files.pending == {} and "old.dcm" in files.handled
    files.keep_only(set(), complete=True)
    assert files.handled == {}


def test_the_tree_leaves_ignored_names_and_links_alone(tmp_path: Path) -> None:
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "a.dcm").write_bytes(b"x")
    (tmp_path / "study" / "b.part").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.dcm").write_bytes(b"x")
    os.symlink(tmp_path / "study", tmp_path / "link")
    tree = FolderTree(tmp_path, (".part",), shown=lambda rel: rel)
    assert sorted(rel for rel, _ in tree.walk()) == ["link", "study/a.dcm"]
    assert tree.walk_complete
    assert tree.inside("study/a.dcm") and not tree.inside("link/a.dcm")
    assert not tree.inside(".hidden/c.dcm") and not tree.inside("study/../x")
    assert tree.lstat("gone.dcm") is None


def test_inotify_notes_relative_paths_and_gives_up_on_too_many(tmp_path: Path, monkeypatch) -> None:
    wake = threading.Event()
    watch = InotifyWatch(tmp_path, wake)
    watch.on_event(FileCreatedEvent(str(tmp_path / "s" / "a.dcm")))
    watch.on_event(FileMovedEvent(str(tmp_path / "b.tmp"), str(tmp_path / "b.dcm")))
    watch.on_event(DirCreatedEvent(str(tmp_path / "s")))
    watch.on_event(FileCreatedEvent(str(tmp_path.parent / "outside.dcm")))
    assert wake.is_set() and not watch.running
    assert watch.take_changes() == ({"s/a.dcm", "b.tmp", "b.dcm"}, {"s"})
    assert watch.take_changes() == (set(), set())
    monkeypatch.setattr(inotify, "MAX_EVENT_PATHS", 2)
    for name in ("x", "y", "z"):
        watch.on_event(FileCreatedEvent(str(tmp_path / name)))
    assert watch.events_lost and watch.changed == set()  # the next scan walks everything
    watch.forget_changes()
    assert not watch.events_lost


def test_still_same_is_false_once_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"x")
    st = os.lstat(path)
    seen = ReadyFile(path, "a.dcm", st.st_size, st.st_mtime_ns, st.st_ino)
    assert still_same(seen)
    path.write_bytes(b"longer")
    assert not still_same(seen)
    path.unlink()
    assert not still_same(seen)
