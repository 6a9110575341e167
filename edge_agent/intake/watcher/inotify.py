"""The inotify part of the watcher: watchdog's observer on the watch folder, noting in its
own thread which paths changed and waking the intake loop, nothing more. Events only say
where to look; :class:`~edge_agent.intake.watcher.FolderWatcher` decides what is ready."""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.utils import UnsupportedLibcError

logger = logging.getLogger(__name__)

MAX_EVENT_PATHS = 50_000  # more changed paths than this between scans: walk the whole tree
_WATCHDOG_INOTIFY_LOGGER = "watchdog.observers.inotify"
# What the watcher listens to: not opened/closed-without-writing (its own reads would wake it).
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirDeletedEvent,  # the watch folder itself removed: inotify is re-armed
    DirMovedEvent,
    EventsLostEvent,
]


def identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the folder at ``path``, or None when there is no folder there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class InotifyWatch:
    """watchdog's inotify observer on ``root`` (recursive), started and stopped as the
    watcher's mode requires. What its thread notes (changed paths relative to ``root``,
    changed folders, lost events, a sub-folder that could not be watched) is read by the
    intake loop under :attr:`lock`; each note sets ``wake``."""

    def __init__(self, root: Path, wake: threading.Event) -> None:
        self.root = root
        self.wake = wake
        self.lock = threading.Lock()
        self.changed: set[str] = set()
        self.changed_dirs: set[str] = set()
        self.events_lost = False
        self.failure: str | None = None  # set by _WatchLimitLog
        self.observer: BaseObserver | None = None  # watchdog's InotifyObserver when running
        self._limit_log: _WatchLimitLog | None = None
        # The watch folder's (st_dev, st_ino) while inotify watches it: another value (or
        # none) means it was removed (and re-created), and the watch must be set again.
        self._root_id: tuple[int, int] | None = None

    @property
    def running(self) -> bool:
        return self.observer is not None

    def start(self) -> str | None:
        """Start watchdog's inotify observer; the reason it failed, or None."""
        self._root_id = identity(self.root)
        try:
            from watchdog.observers.inotify import InotifyObserver
        except (ImportError, OSError, UnsupportedLibcError) as exc:  # no inotify here
            return f"{type(exc).__name__}: {exc}"
        limit_log = _WatchLimitLog(self)
        logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).addHandler(limit_log)
        observer = InotifyObserver()
        try:
            observer.schedule(_Events(self), str(self.root), recursive=True, event_filter=_EVENTS)
            observer.start()
        except OSError as exc:
            logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).removeHandler(limit_log)
            _stop(observer)
            return exc.strerror or str(exc)
        self.observer, self._limit_log = observer, limit_log
        if self.failure is not None:  # a sub-folder failed while starting
            failure = self.failure
            self.close()
            self.failure = None
            return failure
        return None

    def close(self) -> None:
        """Stop the observer (if any)."""
        if self._limit_log is not None:
            logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).removeHandler(self._limit_log)
            self._limit_log = None
        if self.observer is not None:
            observer, self.observer = self.observer, None
            _stop(observer)

    def stopped_working(self) -> str | None:
        """Why the running observer can no longer be trusted to see every change (a
        sub-folder could not be watched, the observer died), or None."""
        if self.failure is None and self.observer is not None and not self.observer.is_alive():
            return "the inotify observer stopped"
        return self.failure

    def watches_root(self) -> bool:
        """The watch is on the folder now at ``root``. inotify's watch dies with the folder
        (watchdog's emitter stops on IN_DELETE_SELF); a folder made again under the same
        name is another inode, and nothing watches it."""
        if self.observer is None:
            return False
        emitters_alive = all(e.is_alive() for e in self.observer.emitters)
        return emitters_alive and identity(self.root) == self._root_id

    def forget_changes(self) -> None:
        """A full walk starts: what changes from here on is looked at by the next scan."""
        with self.lock:
            self.changed.clear()
            self.changed_dirs.clear()
            self.events_lost = False

    def take_changes(self) -> tuple[set[str], set[str]]:
        """(changed paths, changed folders) noted since the last call, relative to root."""
        with self.lock:
            changed, self.changed = self.changed, set()
            dirs, self.changed_dirs = self.changed_dirs, set()
        return changed, dirs

    # -- the observer's thread ----------------------------------------------------------------

    def on_event(self, event: FileSystemEvent) -> None:
        with self.lock:
            if isinstance(event, EventsLostEvent):
                self.events_lost = True
            else:
                paths = [event.src_path]
                if event.dest_path:
                    paths.append(event.dest_path)
                for raw in paths:
                    rel = self._relative(os.fsdecode(raw))
                    if rel is None:
                        continue
                    (self.changed_dirs if event.is_directory else self.changed).add(rel)
                if len(self.changed) + len(self.changed_dirs) > MAX_EVENT_PATHS:
                    self.events_lost = True
            if self.events_lost:
                self.changed.clear()
                self.changed_dirs.clear()
        self.wake.set()

    def _relative(self, path: str) -> str | None:
        rel = os.path.relpath(path, self.root)
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            return None
        return Path(rel).as_posix()


class _WatchLimitLog(logging.Handler):
    """watchdog only logs a warning when a sub-folder cannot be watched (inotify watch limit
    reached): that warning is what tells the watcher to fall back to polling."""

    def __init__(self, watch: InotifyWatch) -> None:
        super().__init__(logging.WARNING)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Unable to watch"):
            self.watch.failure = (
                "a sub-folder could not be watched (inotify watch limit reached? see "
                "fs.inotify.max_user_watches)"
            )
            self.watch.wake.set()


class _Events(FileSystemEventHandler):
    """Runs in watchdog's thread: notes the path and wakes the intake loop, nothing more."""

    def __init__(self, watch: InotifyWatch) -> None:
        self.watch = watch

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.watch.on_event(event)


def _stop(observer: BaseObserver) -> None:
    observer.stop()  # also when it never started: scheduling already opened the inotify reader
    if observer.is_alive():
        observer.join(timeout=5.0)
