"""Finding files in the watch folder that are complete and not yet handled.

A modality, a PACS export or a person copying a CD writes files into the folder. A file is
handed on only when:

* no part of its name is one that writers use while writing (hidden files and folders,
  ``*.part``, ``*.tmp`` …);
* its size, mtime and inode were the same at two looks at least ``file_stable_seconds``
  apart (a slow writer that appends for seconds and never renames is waited for);
* it was not handled before with the same size, mtime and inode. A file replaced in place
  is read again: the same SOPInstanceUID is then a duplicate (the store counts it once),
  another one is a new instance.

How files are noticed (``intake.watch_mode``):

``polling``
    the whole tree is walked every ``poll_interval_seconds``.
``inotify``
    watchdog's inotify observer reports the paths that change; only those are looked at,
    and the whole tree is still walked every ``rescan_seconds`` so that a missed event
    (queue overflow, a folder that could not be watched) never loses a file. Events only
    say where to look: the stability rule above decides, whatever the mode.
``auto``
    inotify on a local filesystem, polling on a network one (NFS, SMB/CIFS, FUSE, …: inotify
    does not see what other machines write there), and polling whenever inotify cannot start
    or stops working (e.g. ``fs.inotify.max_user_watches`` reached). The choice and its
    reason are logged.

An inotify watch dies with its folder: when the watch folder is removed (and made again
under the same name), the watcher polls until it is there, then sets inotify on the new
folder and walks it, saying so in the log (a warning each time).

Memory stays bounded whatever is waiting: per file only its name and a few integers are
kept, no dataset; each ``scan`` hands out at most ``batch_size`` files, oldest first, and a
file handed out but not marked handled goes to the back of the line (one bad file never
blocks the others).

The folder is only ever read: nothing is written, moved or deleted there. Symbolic links
are never followed, neither to files nor to folders, wherever they point (a link could lead
out of the watch folder): copy files in, do not link them. A link, FIFO, socket or device is
handed out like a file, with ``ReadyFile.refused`` saying why it is not read, so that the
daemon reports it (once: it is marked handled with its own size, mtime and inode, and is
handed out again only when it changes). Files are opened by
:mod:`edge_agent.dicom.instance_file`, which checks again on the open descriptor what was
seen here. A file that could not be read (permission, I/O) is handed out again after a
back-off (:meth:`FolderWatcher.retry_later`). Names are Unicode; a name that is not valid
UTF-8 cannot be recorded or reported and is skipped with a warning.
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import FileSystemEvent
from watchdog.observers.api import BaseObserver

from .inotify import MAX_EVENT_PATHS, InotifyWatch, identity
from .mounts import (
    NETWORK_FILESYSTEMS,
    PROC_MOUNTS,
    ActiveMode,
    Mount,
    WatchMode,
    choose_mode,
    is_network_filesystem,
    mount_of,
)
from .stability import RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS, FileStates
from .tree import FolderTree, ReadyFile, still_same

__all__ = [
    "DEFAULT_BATCH",
    "EVENT_SETTLE_SECONDS",
    "MAX_EVENT_PATHS",
    "NETWORK_FILESYSTEMS",
    "PROC_MOUNTS",
    "RETRY_FIRST_SECONDS",
    "RETRY_MAX_SECONDS",
    "ActiveMode",
    "FolderWatcher",
    "Mount",
    "ReadyFile",
    "WatchMode",
    "choose_mode",
    "is_network_filesystem",
    "mount_of",
    "still_same",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 64  # files handed out per scan
EVENT_SETTLE_SECONDS = 0.05  # a burst of events is taken as one wake-up


class FolderWatcher:
    """``scan(now)`` returns files that became ready, at most ``batch_size`` at a time.

    ``now`` is any clock that only moves forward (the daemon passes ``time.monotonic()``).
    Without :meth:`start` (or in polling mode) every call walks the tree at most once per
    ``poll_interval``; :meth:`wait` sleeps until the next scan is due or an event arrives.

    Its parts: :class:`~.mounts` chooses the mode, :class:`~.inotify.InotifyWatch` notes
    what changed, :class:`~.tree.FolderTree` walks the folder, :class:`~.stability.FileStates`
    remembers each file; this class decides when to walk and what is ready.
    """

    def __init__(
        self,
        root: Path,
        *,
        stable_seconds: float,
        ignore_suffixes: Iterable[str],
        handled: dict[str, tuple[int, int]] | None = None,
        watch_mode: WatchMode = "polling",
        poll_interval: float = 0.0,
        rescan_seconds: float = 60.0,
        batch_size: int = DEFAULT_BATCH,
        mounts_file: Path = PROC_MOUNTS,
        retry_max: float = RETRY_MAX_SECONDS,
        shown: Callable[[str], str] | None = None,
    ) -> None:
        self.root = root
        self.stable_seconds = stable_seconds
        self.ignore_suffixes = tuple(ignore_suffixes)
        self.watch_mode: WatchMode = watch_mode
        self.poll_interval = poll_interval
        self.rescan_seconds = rescan_seconds
        self.batch_size = max(1, batch_size)
        self.mounts_file = mounts_file
        self.mode: ActiveMode = "polling"
        self.mode_reason = "not started"
        # How a log line names something below the root (the agent passes its file-id
        # naming: folders are often named after the patient).
        self._tree = FolderTree(root, self.ignore_suffixes, shown or (lambda rel: rel))
        self._files = FileStates(handled, stable_seconds)
        self.retry_first = RETRY_FIRST_SECONDS
        self.retry_max = retry_max
        self._wake = threading.Event()
        self._inotify = InotifyWatch(root, self._wake)
        self._rearm = False  # inotify was in use and is to be set again on the folder
        self._last_walk: float | None = None
        self._more_ready = False

    # What tests and the daemon's loop look at, kept on the facade.
    @property
    def _observer(self) -> BaseObserver | None:
        return self._inotify.observer

    @property
    def _lock(self) -> threading.Lock:
        return self._inotify.lock

    @property
    def _changed(self) -> set[str]:
        return self._inotify.changed

    def _on_event(self, event: FileSystemEvent) -> None:
        self._inotify.on_event(event)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ActiveMode:
        """Choose the mode (``watch_mode``), start the inotify observer if it is the one, and
        log which mode is used and why. Never raises: polling is the fallback."""
        mode, why = choose_mode(self.watch_mode, self.root, self.mounts_file)
        if mode == "inotify":
            failure = self._inotify.start()
            if failure is None:
                self._rearm = True
                self._set_mode("inotify", why)
            else:
                level = logging.WARNING if self.watch_mode == "inotify" else logging.INFO
                self._set_mode("polling", f"inotify could not start: {failure}", level)
        else:
            self._set_mode("polling", why)
        return self.mode

    def _set_mode(self, mode: ActiveMode, why: str, level: int = logging.INFO) -> None:
        self.mode, self.mode_reason = mode, why
        if mode == "inotify":
            logger.log(
                level,
                "watching %s with inotify (full rescan every %.0f s): %s",
                self.root,
                self.rescan_seconds,
                why,
            )
        else:
            logger.log(
                level, "watching %s by polling every %.1f s: %s", self.root, self.poll_interval, why
            )

    def close(self) -> None:
        """Stop the observer (if any). The watcher keeps working by polling."""
        self._inotify.close()

    def _check_observer(self) -> None:
        """Fall back to polling when inotify stopped working; set the watch again when the
        watch folder was removed and re-created (until it is back: polling)."""
        if not self._inotify.running:
            if self._rearm and identity(self.root) is not None:
                self._rearm_inotify()
            return
        failure = self._inotify.stopped_working()
        if failure is not None:
            self._rearm = False
            self.close()
            self._set_mode("polling", f"{failure}; polling from now on", logging.WARNING)
            self._last_walk = None  # walk everything now
            return
        if self._inotify.watches_root():
            return
        self.close()
        self._last_walk = None
        if identity(self.root) is None:
            self._set_mode(
                "polling",
                "the watch folder was removed; polling until it is back, then inotify is set again",
                logging.WARNING,
            )
        else:
            self._rearm_inotify()

    def _rearm_inotify(self) -> None:
        failure = self._inotify.start()
        self._last_walk = None  # walk the new folder now: what came before the watch
        if failure is None:
            self._set_mode(
                "inotify",
                "the watch folder was removed and made again: inotify set again",
                logging.WARNING,
            )
        else:
            self._rearm = False
            self._set_mode("polling", f"inotify could not be set again: {failure}", logging.WARNING)

    # -- waiting ------------------------------------------------------------------------------

    @property
    def more_ready(self) -> bool:
        """The last scan stopped at ``batch_size`` with more files ready: scan again now."""
        return self._more_ready

    def wake(self) -> None:
        """End a :meth:`wait` early (the daemon calls it when stopping)."""
        self._wake.set()

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds, less when a waiting file becomes due for its
        stability check, a walk is due, or (inotify) something changed in the folder.
        Assumes ``scan`` is given ``time.monotonic()``."""
        now = time.monotonic()
        due = self._next_due()
        if due is not None:
            timeout = min(timeout, max(0.05, due - now))
        if self._wake.wait(max(0.0, timeout)):
            self._wake.clear()
            time.sleep(EVENT_SETTLE_SECONDS)  # let a burst of events arrive

    def _next_due(self) -> float | None:
        times = [t for t in (self._files.next_due(),) if t is not None]
        if not self._inotify.running and self._last_walk is not None:
            times.append(self._last_walk + self.poll_interval)
        return min(times) if times else None

    # -- scanning -----------------------------------------------------------------------------

    def _full_walk(self, now: float) -> None:
        self._inotify.forget_changes()  # what changes from here on is looked at by the next scan
        seen: set[str] = set()
        for rel, st in self._tree.walk():
            seen.add(rel)
            self._files.observe(rel, st, now)
        self._files.keep_only(seen, complete=self._tree.walk_complete)
        self._last_walk = now

    def _look_at_changes(self, now: float) -> None:
        changed, dirs = self._inotify.take_changes()
        for rel_dir in dirs:
            if not self._tree.inside(rel_dir, folder=True):
                continue
            st = self._tree.lstat(rel_dir)
            if st is None or not stat.S_ISDIR(st.st_mode):
                continue
            for rel, found in self._tree.walk(rel_dir):
                changed.discard(rel)
                self._files.observe(rel, found, now)
        for rel in changed:
            if self._tree.inside(rel) and self._tree.usable_name(rel):
                self._look_again(rel, now)

    def _look_again(self, rel: str, now: float) -> bool:
        """``lstat`` ``rel`` again: True when it is still the file that is pending; a file
        gone, now a folder, or behind a folder swapped for a link is forgotten (a folder's
        own event has it walked), a changed one observed anew."""
        st = self._tree.lstat(rel)
        if st is None or stat.S_ISDIR(st.st_mode) or ("/" in rel and not self._tree.inside(rel)):
            self._files.forget(rel)
            return False
        now_sig = (st.st_size, st.st_mtime_ns, st.st_ino, stat.S_IFMT(st.st_mode), st.st_dev)
        if rel in self._files.pending and now_sig == self._files.seen_as(rel):
            return True
        self._files.observe(rel, st, now)  # a file, or a link, FIFO … to report
        return False

    def _walk_due(self, now: float) -> bool:
        if self._last_walk is None or now < self._last_walk or self._inotify.events_lost:
            return True
        interval = self.rescan_seconds if self._inotify.running else self.poll_interval
        return now - self._last_walk >= interval - 0.005  # a timed wait may end a hair early

    def scan(self, now: float) -> list[ReadyFile]:
        """Files ready to be read, oldest first, at most ``batch_size``."""
        self._check_observer()
        walked = self._walk_due(now)
        if walked:
            self._full_walk(now)
        else:
            self._look_at_changes(now)
        ready: list[ReadyFile] = []
        self._more_ready = False
        for rel in list(self._files.pending):
            if not self._files.due(rel, now):
                continue
            if len(ready) >= self.batch_size:
                self._more_ready = True
                break
            # without a walk, confirm with a second look: no event is trusted to have come
            if walked or self._look_again(rel, now):
                ready.append(self._files.hand_out(self.root, rel))
        return ready

    def mark_handled(self, f: ReadyFile) -> None:
        self._files.mark_handled(f)

    def retry_later(self, f: ReadyFile, now: float) -> int:
        """``f`` could not be read (an error of the operating system: permission, I/O …):
        hand it out again after a back-off (``retry_first`` seconds, doubling up to
        ``retry_max``), or sooner once it changes. ``now`` is the clock ``scan`` is given.
        Returns how many times it failed so far."""
        return self._files.retry_later(f, now, self.retry_first, self.retry_max)

    @property
    def retrying(self) -> int:
        """Files that could not be read and wait for their next try."""
        return len(self._files.retry)

    def still_same(self, f: ReadyFile) -> bool:
        """True if the file has not changed since it was found ready (read it, then check)."""
        return still_same(f)

    @property
    def waiting(self) -> int:
        """Files seen and not handled yet (growing, or ready and not yet handed out)."""
        return len(self._files.pending)
