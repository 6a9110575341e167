"""What is in the watch folder: walking it (never through a symbolic link), which names are
left alone, and the files handed on (:class:`ReadyFile`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_MAX_WARNED_NAMES = 1_000


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


def still_same(f: ReadyFile) -> bool:
    """True if the file has not changed since it was found ready (read it, then check)."""
    try:
        st = os.lstat(f.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns) and (
        not f.ino or st.st_ino == f.ino
    )


class FolderTree:
    """The tree below ``root`` as the watcher sees it: entries other than folders, with their
    ``lstat``, leaving out ignored names (hidden, ``ignore_suffixes``) and names that are not
    valid UTF-8 (warned about once each, named through ``shown``)."""

    def __init__(
        self, root: Path, ignore_suffixes: Iterable[str], shown: Callable[[str], str]
    ) -> None:
        self.root = root
        self.ignore_suffixes = tuple(ignore_suffixes)
        self._shown = shown
        self._real_root = os.path.realpath(root)
        self._warned_names: set[str] = set()
        self.root_missing = False
        self.walk_complete = True  # the last walk listed every folder

    def ignored(self, name: str) -> bool:
        return name.startswith(".") or name.endswith(self.ignore_suffixes)

    def usable_name(self, rel: str) -> bool:
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

    def walk(self, start_rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
        """Entries below ``start_rel`` other than folders (regular files, and the links, FIFOs
        … that are reported and never read), with their ``lstat``; never through a symbolic
        link. Sets ``walk_complete`` False when a folder could not be listed."""
        self.walk_complete = True
        stack = [start_rel]
        while stack:
            rel_dir = stack.pop()
            folder = os.path.join(self.root, rel_dir) if rel_dir else str(self.root)
            try:
                with os.scandir(folder) as entries:
                    if not rel_dir and self.root_missing:
                        self.root_missing = False
                        logger.info("watch folder %s is there again", folder)
                    for entry in entries:
                        if self.ignored(entry.name):
                            continue
                        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                stack.append(rel)
                            elif self.usable_name(rel):
                                yield rel, entry.stat(follow_symlinks=False)
                        except OSError:
                            continue  # vanished between listing and stat
            except FileNotFoundError:
                if not rel_dir:
                    if not self.root_missing:  # once, not at every poll until it is back
                        logger.warning("cannot list %s: it does not exist", folder)
                    self.root_missing = True
                    self.walk_complete = False
                # else: a sub-folder removed while the tree was walked
            except OSError as exc:
                where = f"sub-folder {self._shown(rel_dir)}" if rel_dir else folder
                logger.warning("cannot list %s: %s", where, exc.strerror)
                self.walk_complete = False

    def inside(self, rel: str, *, folder: bool = False) -> bool:
        """No part of ``rel`` is an ignored name, and the folders on its way (``rel`` itself
        too when ``folder``) are real folders inside the watch folder, not links."""
        parts = rel.split("/")
        if any(self.ignored(p) or p in ("", "..") for p in parts):
            return False
        folders = parts if folder else parts[:-1]
        if not folders:
            return True
        real = os.path.realpath(os.path.join(self.root, *folders))
        return real == os.path.join(self._real_root, *folders)

    def lstat(self, rel: str) -> os.stat_result | None:
        """``lstat`` of ``rel``, or None when nothing is there any more."""
        try:
            return os.lstat(os.path.join(self.root, rel))
        except OSError:
            return None
