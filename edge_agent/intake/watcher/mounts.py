"""Which way the watch folder is watched (``intake.watch_mode``): the mount table says
whether the folder is on a network filesystem, where inotify does not see what other
machines write."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
