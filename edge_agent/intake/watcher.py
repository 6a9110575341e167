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
:mod:`edge_agent.intake.instance_file`, which checks again on the open descriptor what was
seen here. A file that could not be read (permission, I/O) is handed out again after a
back-off (:meth:`FolderWatcher.retry_later`). Names are Unicode; a name that is not valid
UTF-8 cannot be recorded or reported and is skipped with a warning.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

from .instance_file import refusal

logger = logging.getLogger(__name__)

WatchMode = Literal["auto", "inotify", "polling"]
ActiveMode = Literal["inotify", "polling"]

# Filesystems whose changes made elsewhere inotify cannot see (network, cluster, FUSE and
# virtual-machine shares). Any type starting with "fuse" counts too.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "coda",
        "9p",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "gfs2",
        "ocfs2",
        "davfs",
        "sshfs",
        "beegfs",
    }
)
PROC_MOUNTS = Path("/proc/mounts")

DEFAULT_BATCH = 64  # files handed out per scan
RETRY_FIRST_SECONDS = 1.0  # a file that could not be read: first retry after this, doubling
RETRY_MAX_SECONDS = 300.0  # … up to this
MAX_EVENT_PATHS = 50_000  # more changed paths than this between scans: walk the whole tree
EVENT_SETTLE_SECONDS = 0.05  # a burst of events is taken as one wake-up
_MAX_WARNED_NAMES = 1_000
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

Signature = tuple[int, int, int]  # size, mtime_ns, inode
# handled: (size, mtime_ns, inode or None when it came from the state database)
Handled = tuple[int, int, int | None]


@dataclass(frozen=True)
class ReadyFile:
    """A file ready to be read, from one of the intake's roots (the watch folder, or the
    Storage SCP's receive folder: :class:`~edge_agent.intake.scp.ReceivedFolder`)."""

    path: Path  # absolute: root / relpath
    relpath: str  # relative to root, POSIX separators
    size: int
    mtime_ns: int
    ino: int = 0
    refused: str | None = None  # not a regular file (a link, FIFO …): why it is not read
    dev: int = 0  # st_dev (0: not known)
    root: Path | None = None  # the folder relpath is relative to (None: the watch folder)
    # What the store's files table records (and file_id hashes): relpath for the watch
    # folder; the absolute path for a received file (ReceivedFolder says why). "": relpath.
    recorded: str = ""

    def __post_init__(self) -> None:
        if not self.recorded:
            object.__setattr__(self, "recorded", self.relpath)


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str


def _unescape_mount_field(text: str) -> str:
    r"""/proc/mounts writes space, tab, newline and backslash as \040, \011, \012, \134."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        chunk = text[i + 1 : i + 4]
        if text[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def mount_of(path: Path, mounts_file: Path = PROC_MOUNTS) -> Mount | None:
    """The mount that holds ``path`` (the longest mount point above its real path), or None
    when the mount table cannot be read."""
    try:
        lines = mounts_file.read_text(errors="replace").splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best: Mount | None = None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = _unescape_mount_field(parts[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        # a later line for the same mount point is mounted over the earlier one
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = Mount(point, parts[2], _unescape_mount_field(parts[0]))
    return best


def is_network_filesystem(fstype: str) -> bool:
    kind = fstype.lower()
    return kind in NETWORK_FILESYSTEMS or kind.startswith("fuse")


def choose_mode(
    requested: WatchMode, root: Path, mounts_file: Path = PROC_MOUNTS
) -> tuple[ActiveMode, str]:
    """The mode to try for ``root`` and why (before trying: inotify may still fail to start)."""
    if requested == "polling":
        return "polling", "intake.watch_mode is polling"
    mount = mount_of(root, mounts_file)
    where = f"{mount.fstype} mounted at {mount.mount_point}" if mount else "filesystem unknown"
    if requested == "inotify":
        return "inotify", f"intake.watch_mode is inotify ({where})"
    if not sys.platform.startswith("linux"):
        return "polling", f"inotify exists only on Linux (this is {sys.platform})"
    if mount is not None and is_network_filesystem(mount.fstype):
        return "polling", (
            f"{root} is on a network filesystem ({where}): inotify does not see files that "
            "other machines write there"
        )
    return "inotify", f"local filesystem ({where})"


class _WatchLimitLog(logging.Handler):
    """watchdog only logs a warning when a sub-folder cannot be watched (inotify watch limit
    reached): that warning is what tells the watcher to fall back to polling."""

    def __init__(self, watcher: FolderWatcher) -> None:
        super().__init__(logging.WARNING)
        self.watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Unable to watch"):
            self.watcher._watch_failure = (
                "a sub-folder could not be watched (inotify watch limit reached? see "
                "fs.inotify.max_user_watches)"
            )
            self.watcher._wake.set()


class FolderWatcher:
    """``scan(now)`` returns files that became ready, at most ``batch_size`` at a time.

    ``now`` is any clock that only moves forward (the daemon passes ``time.monotonic()``).
    Without :meth:`start` (or in polling mode) every call walks the tree at most once per
    ``poll_interval``; :meth:`wait` sleeps until the next scan is due or an event arrives.
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
        # How a log line names something below the root (the agent passes its file-id
        # naming: folders are often named after the patient).
        self._shown: Callable[[str], str] = shown or (lambda rel: rel)
        self.stable_seconds = stable_seconds
        self.ignore_suffixes = tuple(ignore_suffixes)
        self.watch_mode: WatchMode = watch_mode
        self.poll_interval = poll_interval
        self.rescan_seconds = rescan_seconds
        self.batch_size = max(1, batch_size)
        self.mounts_file = mounts_file
        self.mode: ActiveMode = "polling"
        self.mode_reason = "not started"
        self._real_root = os.path.realpath(root)
        self._handled: dict[str, Handled] = {
            rel: (size, mtime, None) for rel, (size, mtime) in (handled or {}).items()
        }
        # relpath -> (size, mtime_ns, inode, file type (S_IFMT), device, when this signature
        # was first seen); in the order files were found, so the oldest are handed out first.
        self._pending: dict[str, tuple[int, int, int, int, int, float]] = {}
        # relpath -> (attempts, when to hand it out again): files that could not be read
        self._retry: dict[str, tuple[int, float]] = {}
        self.retry_first = RETRY_FIRST_SECONDS
        self.retry_max = retry_max
        # The watch folder's (st_dev, st_ino) while inotify watches it: another value (or
        # none) means it was removed (and re-created), and the watch must be set again.
        self._root_id: tuple[int, int] | None = None
        self._rearm = False  # inotify was in use and is to be set again on the folder
        self._root_missing = False
        self._last_walk: float | None = None
        self._more_ready = False
        self._warned_names: set[str] = set()
        # filled by the observer's thread
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._changed: set[str] = set()
        self._changed_dirs: set[str] = set()
        self._events_lost = False
        self._watch_failure: str | None = None
        self._walk_complete = True
        self._observer: BaseObserver | None = None  # watchdog's InotifyObserver when running
        self._limit_log: _WatchLimitLog | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ActiveMode:
        """Choose the mode (``watch_mode``), start the inotify observer if it is the one, and
        log which mode is used and why. Never raises: polling is the fallback."""
        mode, why = choose_mode(self.watch_mode, self.root, self.mounts_file)
        if mode == "inotify":
            failure = self._start_inotify()
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

    def _start_inotify(self) -> str | None:
        """Start watchdog's inotify observer; the reason it failed, or None."""
        self._root_id = _identity(self.root)
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
        self._observer, self._limit_log = observer, limit_log
        if self._watch_failure is not None:  # a sub-folder failed while starting
            failure = self._watch_failure
            self.close()
            self._watch_failure = None
            return failure
        return None

    def close(self) -> None:
        """Stop the observer (if any). The watcher keeps working by polling."""
        if self._limit_log is not None:
            logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).removeHandler(self._limit_log)
            self._limit_log = None
        if self._observer is not None:
            observer, self._observer = self._observer, None
            _stop(observer)

    def _check_observer(self) -> None:
        """Fall back to polling when inotify stopped working; set the watch again when the
        watch folder was removed and re-created (until it is back: polling)."""
        if self._observer is None:
            if self._rearm and _identity(self.root) is not None:
                self._rearm_inotify()
            return
        failure = self._watch_failure
        if failure is None and not self._observer.is_alive():
            failure = "the inotify observer stopped"
        if failure is not None:
            self._rearm = False
            self.close()
            self._set_mode("polling", f"{failure}; polling from now on", logging.WARNING)
            self._last_walk = None  # walk everything now
            return
        # inotify's watch dies with the folder (watchdog's emitter stops on IN_DELETE_SELF); a
        # folder made again under the same name is another inode, and nothing watches it.
        emitters_alive = all(e.is_alive() for e in self._observer.emitters)
        if emitters_alive and _identity(self.root) == self._root_id:
            return
        self.close()
        self._last_walk = None
        if _identity(self.root) is None:
            self._set_mode(
                "polling",
                "the watch folder was removed; polling until it is back, then inotify is set again",
                logging.WARNING,
            )
        else:
            self._rearm_inotify()

    def _rearm_inotify(self) -> None:
        failure = self._start_inotify()
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

    # -- events (observer thread) -------------------------------------------------------------

    def _on_event(self, event: FileSystemEvent) -> None:
        with self._lock:
            if isinstance(event, EventsLostEvent):
                self._events_lost = True
            else:
                paths = [event.src_path]
                if event.dest_path:
                    paths.append(event.dest_path)
                for raw in paths:
                    rel = self._relative(os.fsdecode(raw))
                    if rel is None:
                        continue
                    (self._changed_dirs if event.is_directory else self._changed).add(rel)
                if len(self._changed) + len(self._changed_dirs) > MAX_EVENT_PATHS:
                    self._events_lost = True
            if self._events_lost:
                self._changed.clear()
                self._changed_dirs.clear()
        self._wake.set()

    def _relative(self, path: str) -> str | None:
        rel = os.path.relpath(path, self.root)
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            return None
        return Path(rel).as_posix()

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
        due = self._next_due(now)
        if due is not None:
            timeout = min(timeout, max(0.05, due - now))
        if self._wake.wait(max(0.0, timeout)):
            self._wake.clear()
            time.sleep(EVENT_SETTLE_SECONDS)  # let a burst of events arrive

    def _next_due(self, now: float) -> float | None:
        times = [
            max(since + self.stable_seconds, self._retry.get(rel, (0, 0.0))[1])
            for rel, (*_, since) in self._pending.items()
        ]
        if self._observer is None and self._last_walk is not None:
            times.append(self._last_walk + self.poll_interval)
        return min(times) if times else None

    # -- scanning -----------------------------------------------------------------------------

    def _ignored(self, name: str) -> bool:
        return name.startswith(".") or name.endswith(self.ignore_suffixes)

    def _usable_name(self, rel: str) -> bool:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if shown not in self._warned_names and len(self._warned_names) < _MAX_WARNED_NAMES:
                self._warned_names.add(shown)
                logger.warning(
                    "skipping %s: its name is not valid UTF-8 (rename it)", self._shown(shown)
                )
            return False
        return True

    def _walk(self, start_rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
        """Entries below ``start_rel`` other than folders (regular files, and the links, FIFOs
        … that are reported and never read), with their ``lstat``; never through a symbolic
        link. Sets ``_walk_complete`` False when a folder could not be listed."""
        self._walk_complete = True
        stack = [start_rel]
        while stack:
            rel_dir = stack.pop()
            folder = os.path.join(self.root, rel_dir) if rel_dir else str(self.root)
            try:
                with os.scandir(folder) as entries:
                    if not rel_dir and self._root_missing:
                        self._root_missing = False
                        logger.info("watch folder %s is there again", folder)
                    for entry in entries:
                        if self._ignored(entry.name):
                            continue
                        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                stack.append(rel)
                            elif self._usable_name(rel):
                                yield rel, entry.stat(follow_symlinks=False)
                        except OSError:
                            continue  # vanished between listing and stat
            except FileNotFoundError:
                if not rel_dir:
                    if not self._root_missing:  # once, not at every poll until it is back
                        logger.warning("cannot list %s: it does not exist", folder)
                    self._root_missing = True
                    self._walk_complete = False
                # else: a sub-folder removed while the tree was walked
            except OSError as exc:
                where = f"sub-folder {self._shown(rel_dir)}" if rel_dir else folder
                logger.warning("cannot list %s: %s", where, exc.strerror)
                self._walk_complete = False

    def _inside(self, rel: str, *, folder: bool = False) -> bool:
        """No part of ``rel`` is an ignored name, and the folders on its way (``rel`` itself
        too when ``folder``) are real folders inside the watch folder, not links."""
        parts = rel.split("/")
        if any(self._ignored(p) or p in ("", "..") for p in parts):
            return False
        folders = parts if folder else parts[:-1]
        if not folders:
            return True
        real = os.path.realpath(os.path.join(self.root, *folders))
        return real == os.path.join(self._real_root, *folders)

    def _observe(self, rel: str, st: os.stat_result, now: float) -> None:
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        handled = self._handled.get(rel)
        if handled is not None and _same(handled, sig):
            self._pending.pop(rel, None)
            self._retry.pop(rel, None)
            return
        pending = self._pending.get(rel)
        kind = stat.S_IFMT(st.st_mode)
        if pending is None or pending[:5] != (*sig, kind, st.st_dev):
            self._pending[rel] = (*sig, kind, st.st_dev, now)
            if pending is not None:
                self._retry.pop(rel, None)  # changed: read it again once it is stable

    def _forget(self, rel: str) -> None:
        self._pending.pop(rel, None)
        self._handled.pop(rel, None)
        self._retry.pop(rel, None)

    def _full_walk(self, now: float) -> None:
        with self._lock:  # what changes from here on is looked at by the next scan
            self._changed.clear()
            self._changed_dirs.clear()
            self._events_lost = False
        seen: set[str] = set()
        for rel, st in self._walk():
            seen.add(rel)
            self._observe(rel, st, now)
        for rel in [r for r in self._pending if r not in seen]:
            del self._pending[rel]  # deleted or renamed before it was handed out
            self._retry.pop(rel, None)
        if self._walk_complete:  # forget files that are gone (memory follows the folder)
            for rel in [r for r in self._handled if r not in seen]:
                del self._handled[rel]
        self._last_walk = now

    def _look_at_changes(self, now: float) -> None:
        with self._lock:
            changed, self._changed = self._changed, set()
            dirs, self._changed_dirs = self._changed_dirs, set()
        for rel_dir in dirs:
            if not self._inside(rel_dir, folder=True):
                continue
            try:
                if not stat.S_ISDIR(os.lstat(os.path.join(self.root, rel_dir)).st_mode):
                    continue
            except OSError:
                continue
            for rel, st in self._walk(rel_dir):
                changed.discard(rel)
                self._observe(rel, st, now)
        for rel in changed:
            if not self._inside(rel) or not self._usable_name(rel):
                continue
            try:
                st = os.lstat(os.path.join(self.root, rel))
            except OSError:
                self._forget(rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                self._forget(rel)  # now a folder: its own event has it walked
            else:
                self._observe(rel, st, now)  # a file, or a link, FIFO … to report

    def _walk_due(self, now: float) -> bool:
        if self._last_walk is None or now < self._last_walk or self._events_lost:
            return True
        interval = self.rescan_seconds if self._observer is not None else self.poll_interval
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
        for rel in list(self._pending):
            size, mtime, ino, kind, dev, since = self._pending[rel]
            if now - since < self.stable_seconds or now < self._retry.get(rel, (0, 0.0))[1]:
                continue
            if len(ready) >= self.batch_size:
                self._more_ready = True
                break
            if not walked:  # confirm with a second look: no event is trusted to have come
                try:
                    st = os.lstat(os.path.join(self.root, rel))
                except OSError:
                    self._forget(rel)
                    continue
                # a folder on its way replaced by a link since it was seen: not through it
                if stat.S_ISDIR(st.st_mode) or ("/" in rel and not self._inside(rel)):
                    self._forget(rel)
                    continue
                now_sig = (
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ino,
                    stat.S_IFMT(st.st_mode),
                    st.st_dev,
                )
                if now_sig != (size, mtime, ino, kind, dev):
                    self._observe(rel, st, now)
                    continue
            # to the back of the line until it is marked handled
            del self._pending[rel]
            self._pending[rel] = (size, mtime, ino, kind, dev, since)
            ready.append(
                ReadyFile(self.root / rel, rel, size, mtime, ino, refusal(kind), dev, self.root)
            )
        return ready

    def mark_handled(self, f: ReadyFile) -> None:
        self._handled[f.relpath] = (f.size, f.mtime_ns, f.ino or None)
        self._pending.pop(f.relpath, None)
        self._retry.pop(f.relpath, None)

    def retry_later(self, f: ReadyFile, now: float) -> int:
        """``f`` could not be read (an error of the operating system: permission, I/O …):
        hand it out again after a back-off (``retry_first`` seconds, doubling up to
        ``retry_max``), or sooner once it changes. ``now`` is the clock ``scan`` is given.
        Returns how many times it failed so far."""
        attempts = self._retry.get(f.relpath, (0, 0.0))[0] + 1
        delay = min(self.retry_max, self.retry_first * 2 ** min(attempts - 1, 30))
        self._retry[f.relpath] = (attempts, now + delay)
        return attempts

    @property
    def retrying(self) -> int:
        """Files that could not be read and wait for their next try."""
        return len(self._retry)

    def still_same(self, f: ReadyFile) -> bool:
        """True if the file has not changed since it was found ready (read it, then check)."""
        try:
            st = os.lstat(f.path)
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns) and (
            not f.ino or st.st_ino == f.ino
        )

    @property
    def waiting(self) -> int:
        """Files seen and not handled yet (growing, or ready and not yet handed out)."""
        return len(self._pending)


class _Events(FileSystemEventHandler):
    """Runs in watchdog's thread: notes the path and wakes the intake loop, nothing more."""

    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.watcher._on_event(event)


def _stop(observer: BaseObserver) -> None:
    observer.stop()  # also when it never started: scheduling already opened the inotify reader
    if observer.is_alive():
        observer.join(timeout=5.0)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _same(handled: Handled, sig: Signature) -> bool:
    size, mtime, ino = handled
    return (size, mtime) == sig[:2] and (ino is None or ino == sig[2])
