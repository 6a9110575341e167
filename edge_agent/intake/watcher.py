"""Finding files in the watch folder that are complete and not yet handled.

A modality (or a PACS export) writes files into the folder. A file is handed on only when:

* its name is not one that writers use while writing (hidden files, ``*.part``, ``*.tmp`` …);
* its size and mtime have not changed for ``file_stable_seconds`` (slow writers that never
  rename are waited for);
* it was not handled before with the same size and mtime (the state database remembers).

The folder is only ever read: nothing is written, moved or deleted there. Symbolic links are
not followed (a link could lead out of the watch folder).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadyFile:
    path: Path  # absolute
    relpath: str  # relative to the watch folder, POSIX separators
    size: int
    mtime_ns: int


class FolderWatcher:
    """Polling scanner. ``scan(now)`` returns the files that became ready since last time."""

    def __init__(
        self,
        root: Path,
        *,
        stable_seconds: float,
        ignore_suffixes: Iterable[str],
        handled: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        self.root = root
        self.stable_seconds = stable_seconds
        self.ignore_suffixes = tuple(ignore_suffixes)
        self._handled: dict[str, tuple[int, int]] = dict(handled or {})
        # relpath -> (size, mtime_ns, first time this signature was seen)
        self._pending: dict[str, tuple[int, int, float]] = {}

    def _ignored(self, name: str) -> bool:
        return name.startswith(".") or name.endswith(self.ignore_suffixes)

    def _walk(self) -> Iterator[tuple[str, os.stat_result]]:
        stack = [self.root]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                logger.warning("cannot list %s: %s", folder, exc.strerror)
                continue
            for entry in entries:
                if self._ignored(entry.name):
                    continue
                try:
                    if entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        rel = Path(entry.path).relative_to(self.root).as_posix()
                        yield rel, entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished between listing and stat

    def scan(self, now: float) -> list[ReadyFile]:
        ready: list[ReadyFile] = []
        seen: set[str] = set()
        for rel, st in self._walk():
            seen.add(rel)
            sig = (st.st_size, st.st_mtime_ns)
            if self._handled.get(rel) == sig:
                continue
            pending = self._pending.get(rel)
            if pending is None or pending[:2] != sig:
                self._pending[rel] = (*sig, now)
                if self.stable_seconds > 0:
                    continue
                pending = self._pending[rel]
            if now - pending[2] >= self.stable_seconds:
                ready.append(ReadyFile(self.root / rel, rel, st.st_size, st.st_mtime_ns))
        for rel in list(self._pending):
            if rel not in seen:
                del self._pending[rel]  # deleted or renamed before it was stable
        return ready

    def mark_handled(self, f: ReadyFile) -> None:
        self._handled[f.relpath] = (f.size, f.mtime_ns)
        self._pending.pop(f.relpath, None)

    def still_same(self, f: ReadyFile) -> bool:
        """True if the file has not changed since it was found ready (read it, then check)."""
        try:
            st = f.path.stat()
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns)
