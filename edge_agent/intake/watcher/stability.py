"""The watcher's memory of each file: when it was first seen as it is now (the stability
rule), whether it was handled as it is now, and when a file that could not be read is
tried again. Per file only its name and a few integers are kept."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ...dicom.instance_file import refusal
from .tree import ReadyFile

RETRY_FIRST_SECONDS = 1.0  # a file that could not be read: first retry after this, doubling
RETRY_MAX_SECONDS = 300.0  # … up to this

Signature = tuple[int, int, int]  # size, mtime_ns, inode
# handled: (size, mtime_ns, inode or None when it came from the state database)
Handled = tuple[int, int, int | None]


class FileStates:
    """``handled``: what was handed on and marked handled, with its signature then;
    ``pending``: seen and not handled, in the order found (the oldest is handed out first);
    ``retry``: files that could not be read, with their attempts and next try."""

    def __init__(
        self,
        handled: dict[str, tuple[int, int]] | None,
        stable_seconds: float,
    ) -> None:
        self.stable_seconds = stable_seconds
        self.handled: dict[str, Handled] = {
            rel: (size, mtime, None) for rel, (size, mtime) in (handled or {}).items()
        }
        # relpath -> (size, mtime_ns, inode, file type (S_IFMT), device, when this signature
        # was first seen)
        self.pending: dict[str, tuple[int, int, int, int, int, float]] = {}
        # relpath -> (attempts, when to hand it out again)
        self.retry: dict[str, tuple[int, float]] = {}

    def observe(self, rel: str, st: os.stat_result, now: float) -> None:
        """``rel`` looks like ``st`` at ``now``: a new or changed signature starts its
        stability wait again; one already handled is not pending."""
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        handled = self.handled.get(rel)
        if handled is not None and _same(handled, sig):
            self.pending.pop(rel, None)
            self.retry.pop(rel, None)
            return
        pending = self.pending.get(rel)
        kind = stat.S_IFMT(st.st_mode)
        if pending is None or pending[:5] != (*sig, kind, st.st_dev):
            self.pending[rel] = (*sig, kind, st.st_dev, now)
            if pending is not None:
                self.retry.pop(rel, None)  # changed: read it again once it is stable

    def forget(self, rel: str) -> None:
        self.pending.pop(rel, None)
        self.handled.pop(rel, None)
        self.retry.pop(rel, None)

    def keep_only(self, seen: set[str], *, complete: bool) -> None:
        """After a walk that saw ``seen``: what is gone is no longer pending and, when the
        walk listed every folder, no longer remembered (memory follows the folder)."""
        for rel in [r for r in self.pending if r not in seen]:
            del self.pending[rel]  # deleted or renamed before it was handed out
            self.retry.pop(rel, None)
        if complete:
            for rel in [r for r in self.handled if r not in seen]:
                del self.handled[rel]

    def due(self, rel: str, now: float) -> bool:
        """Pending ``rel`` may be handed out at ``now``: stable long enough, retry due."""
        since = self.pending[rel][5]
        return not (now - since < self.stable_seconds or now < self.retry.get(rel, (0, 0.0))[1])

    def due_at(self, rel: str) -> float:
        """When pending ``rel`` may be handed out: stable long enough, and its retry due."""
        since = self.pending[rel][5]
        return max(since + self.stable_seconds, self.retry.get(rel, (0, 0.0))[1])

    def next_due(self) -> float | None:
        return min((self.due_at(rel) for rel in self.pending), default=None)

    def seen_as(self, rel: str) -> tuple[int, int, int, int, int]:
        """(size, mtime_ns, inode, file type, device) of pending ``rel``."""
        return self.pending[rel][:5]

    def hand_out(self, root: Path, rel: str) -> ReadyFile:
        """``rel`` as a :class:`ReadyFile`; it goes to the back of the line until it is
        marked handled (one bad file never blocks the others)."""
        entry = self.pending.pop(rel)
        self.pending[rel] = entry
        size, mtime, ino, kind, dev, _ = entry
        return ReadyFile(root / rel, rel, size, mtime, ino, refusal(kind), dev, root)

    def mark_handled(self, f: ReadyFile) -> None:
        self.handled[f.relpath] = (f.size, f.mtime_ns, f.ino or None)
        self.pending.pop(f.relpath, None)
        self.retry.pop(f.relpath, None)

    def retry_later(self, f: ReadyFile, now: float, first: float, longest: float) -> int:
        """``f`` is handed out again ``first`` seconds from ``now``, doubling with each
        failure up to ``longest`` (or sooner once it changes); returns the failures so far."""
        attempts = self.retry.get(f.relpath, (0, 0.0))[0] + 1
        delay = min(longest, first * 2 ** min(attempts - 1, 30))
        self.retry[f.relpath] = (attempts, now + delay)
        return attempts


def _same(handled: Handled, sig: Signature) -> bool:
    size, mtime, ino = handled
    return (size, mtime) == sig[:2] and (ino is None or ino == sig[2])
