"""Opening one instance file from the watch folder (or the C-STORE receive folder), safely.

Every read of an instance file goes through :func:`open_instance` / :func:`read_dataset`:
the intake's header read and, through :func:`read_again`, the scorer's pixel and CT reads
and the narrative's image read. The
watcher decides from ``lstat`` that a name is a regular file; between that look and the
open, a writer could swap in a symbolic link (to a file outside the folder) or a FIFO (a
read would block for ever). So the path is never resolved by the kernel in one go:

* each folder on the way is opened relative to the one before (``dir_fd``) with
  ``O_NOFOLLOW | O_DIRECTORY``: a folder replaced by a link is refused;
* the file itself is opened with ``O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC``: a link is refused,
  and opening a FIFO or a device does not wait for a peer;
* ``fstat`` on the open descriptor must show a regular file and, when the caller says what
  it saw (:class:`Seen`: the watcher's size, mtime, inode and device), that very file;
* the dataset is read from that descriptor, never by name again.

The watch folder itself (the configured ``watch_dir``) may be a link: that is the operator's
choice. A path recorded as absolute (a file the C-STORE receiver wrote under its own
folder) is opened from its folder when it is not inside ``root``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple, Protocol

import pydicom

from ..errors import InputRejected
from .errors import reading
from .uid import valid_uid

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC
_GONE = (errno.ENOENT, errno.ENOTDIR)


class Seen(Protocol):
    """What the watcher saw of the file (``ReadyFile`` has these)."""

    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def ino(self) -> int: ...
    @property
    def dev(self) -> int: ...


class FileProblem(InputRejected):
    """The file could not be opened or read as the regular file that was seen."""


class FileGone(FileProblem):
    """Nothing (or a folder on the way no longer) at that path."""


class NotRegularFile(FileProblem):
    """A symbolic link, FIFO, socket, device or folder: never followed, never read."""


class FileChanged(FileProblem):
    """A regular file, but not the one that was seen (replaced or written since)."""


class FileUnreadable(FileProblem):
    """An error from the operating system (permission, I/O, a stale network mount …):
    may pass, so the intake retries it; ``errno`` says which."""

    def __init__(self, reason: str, errno_: int | None) -> None:
        super().__init__(reason)
        self.errno = errno_


class OtherInstance(InputRejected):
    """The file now holds another SOP Instance UID than the one recorded."""


def refusal(mode: int) -> str | None:
    """Why an entry of this ``st_mode`` is never read, or None for a regular file. The one
    wording of these reasons (the watcher reports them on ``P/rejected``)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "symbolic link: not followed; copy the file in instead"
    if stat.S_ISDIR(mode):
        return "folder: not a regular file"
    if stat.S_ISFIFO(mode):
        return "FIFO: not a regular file"
    if stat.S_ISSOCK(mode):
        return "socket: not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device: not a regular file"
    return "not a regular file"


def _unreadable(exc: OSError) -> FileUnreadable:
    return FileUnreadable(f"cannot read file ({exc.strerror or type(exc).__name__})", exc.errno)


class _Where(NamedTuple):
    base: str  # opened as given (may be a link: the operator's folder)
    parts: tuple[str, ...]  # opened one by one, never following a link


def _where(root: Path, path: str | Path) -> _Where:
    pure = PurePosixPath(path)
    if pure.is_absolute():
        try:
            pure = pure.relative_to(PurePosixPath(os.path.abspath(root)))
        except ValueError:  # the receiver's own folder: open from the file's folder
            return _Where(str(pure.parent), (pure.name,))
    parts = pure.parts
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise FileGone(f"not a path inside the folder: {path}")
    return _Where(str(root), parts)


def _lstat_at(name: str, folder: int) -> int | None:
    try:
        return os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
    except OSError:
        return None


def _open_fd(root: Path, path: str | Path) -> int:
    where = _where(root, path)
    try:
        folder = os.open(where.base, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _GONE:
            raise FileGone("the folder is gone") from exc
        raise _unreadable(exc) from exc
    try:
        for part in where.parts[:-1]:
            try:
                inner = os.open(part, _DIR_FLAGS, dir_fd=folder)
            except OSError as exc:
                mode = _lstat_at(part, folder)
                if mode is not None and stat.S_ISLNK(mode):
                    raise NotRegularFile(
                        "a folder on its path is a symbolic link: not followed"
                    ) from exc
                if mode is None or exc.errno in _GONE:
                    raise FileGone("the file is gone") from exc
                raise _unreadable(exc) from exc
            os.close(folder)
            folder = inner
        name = where.parts[-1]
        try:
            return os.open(name, _FILE_FLAGS, dir_fd=folder)
        except OSError as exc:
            # ELOOP: a link; ENXIO: a socket (or a FIFO's peer missing); a device …: say what
            # the entry is rather than the error its open gave.
            mode = _lstat_at(name, folder)
            if mode is None or exc.errno in _GONE:
                raise FileGone("the file is gone") from exc
            reason = refusal(mode)
            if reason is not None:
                raise NotRegularFile(reason) from exc
            raise _unreadable(exc) from exc
    finally:
        os.close(folder)


@contextmanager
def open_instance(root: Path, path: str | Path, seen: Seen | None = None) -> Iterator[BinaryIO]:
    """The file ``path`` (relative to ``root``) opened for reading, checked to be a regular
    file and, with ``seen``, the one seen (same device, inode, size and mtime). Raises a
    :class:`FileProblem`; an ``OSError`` while reading from it is the caller's (see
    :func:`read_dataset`)."""
    fd = _open_fd(root, path)
    try:
        st = os.fstat(fd)
        reason = refusal(st.st_mode)
        if reason is not None:
            raise NotRegularFile(reason)
        if seen is not None and (
            (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns)
            or (seen.ino and st.st_ino != seen.ino)
            or (seen.dev and st.st_dev != seen.dev)
        ):
            raise FileChanged("the file changed after it was seen")
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:
        yield file


def read_dataset(
    root: Path,
    path: str | Path,
    *,
    pixels: bool = True,
    seen: Seen | None = None,
    sop_instance_uid: str | None = None,
) -> pydicom.Dataset:
    """The DICOM dataset in ``path``, read through :func:`open_instance` (header only unless
    ``pixels``). With ``sop_instance_uid``: raises :class:`OtherInstance` when the file now
    holds another instance. pydicom's own errors on a corrupt file pass through to the
    caller, which words them; an ``OSError`` while reading becomes :class:`FileUnreadable`."""
    with open_instance(root, path, seen) as file:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=not pixels)
        except OSError as exc:
            raise _unreadable(exc) from exc
    found = valid_uid(ds.get("SOPInstanceUID"))
    if sop_instance_uid is not None and found != sop_instance_uid:
        raise OtherInstance("the file now holds another instance")
    return ds


@dataclass(frozen=True)
class Rereading:
    """How a stage that reads a recorded instance file again words what can have happened to
    it since its header was read (short, PHI-free: these reach ``P/rejected`` and
    ``narrative_error``). ``unreadable`` may hold ``{error}`` (see
    :func:`edge_agent.dicom.errors.reading`); without ``not_dicom`` a file that is no longer
    DICOM at all is ``unreadable`` too."""

    gone: str
    replaced: str
    unreadable: str
    not_dicom: str | None = None


def read_again(
    root: Path,
    path: str | Path,
    sop_instance_uid: str | None,
    words: Rereading,
    *,
    pixels: bool = True,
) -> pydicom.Dataset:
    """The recorded instance file ``path`` read again (as :func:`read_dataset` reads it),
    checked to hold ``sop_instance_uid`` (no check when None). Raises
    :class:`~edge_agent.errors.InputRejected` worded by ``words``; an error of the operating
    system stays :class:`FileUnreadable`."""
    try:
        with reading(words.unreadable, not_dicom=words.not_dicom):
            return read_dataset(root, path, pixels=pixels, sop_instance_uid=sop_instance_uid)
    except FileGone as exc:
        raise InputRejected(words.gone) from exc
    except OtherInstance as exc:
        raise InputRejected(words.replaced) from exc
