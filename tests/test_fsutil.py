"""edge_agent/fsutil.py: the one directory fsync every durable writer uses."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from edge_agent.fsutil import fsync_dir

PACKAGES = [Path(__file__).parent.parent / name for name in ("edge_agent", "export")]


def test_fsync_dir_syncs_a_folder_and_refuses_anything_else(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    fsync_dir(tmp_path)
    fsync_dir(str(tmp_path))
    with pytest.raises(NotADirectoryError):  # a file is not a folder whose entries can sync
        fsync_dir(tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "gone")


def _fsyncs_of_something_else(path: Path) -> list[int]:
    """Lines of ``path`` that call os.fsync on anything but an open file's ``fileno()``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "fsync"
            and not (
                node.args
                and isinstance(node.args[0], ast.Call)
                and isinstance(node.args[0].func, ast.Attribute)
                and node.args[0].func.attr == "fileno"
            )
        ):
            lines.append(node.lineno)
    return lines


def test_every_folder_fsync_is_fsync_dir() -> None:
    """A folder is synced in one place: a copy elsewhere drifts (one lacked O_DIRECTORY and
    synced a file without complaint)."""
    found = {
        str(path.relative_to(path.parents[1])): lines
        for package in PACKAGES
        for path in sorted(package.rglob("*.py"))
        if path.name != "fsutil.py" and (lines := _fsyncs_of_something_else(path))
    }
    assert found == {}
