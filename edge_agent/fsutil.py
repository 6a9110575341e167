"""Small filesystem helpers shared by every module that writes files durably."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path | str) -> None:
    """Make a rename (or a new entry) inside ``folder`` durable: a power cut must not undo it.

    POSIX only syncs a folder's entries through a descriptor of the folder itself; where
    folders cannot be opened (no ``O_DIRECTORY``) this is a no-op. Raises ``OSError``."""
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:
        return
    fd = os.open(folder, os.O_RDONLY | flag)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
