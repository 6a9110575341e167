"""Intake: when a file is ready, what its header says, and reasons for what is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge_agent.errors import InputRejected
from edge_agent.intake.header import Skipped, read_header
from edge_agent.intake.watcher import FolderWatcher

SUFFIXES = (".part", ".tmp")


def watcher(root: Path, stable: float = 2.0, handled: dict | None = None) -> FolderWatcher:
    return FolderWatcher(root, stable_seconds=stable, ignore_suffixes=SUFFIXES, handled=handled)


def test_file_is_ready_only_after_it_stops_changing(tmp_path: Path) -> None:
    w = watcher(tmp_path)
    f = tmp_path / "a.dcm"
    f.write_bytes(b"x" * 10)
    assert w.scan(100.0) == []
    assert w.scan(101.0) == []
    with f.open("ab") as fh:  # a slow writer appends
        fh.write(b"y" * 10)
    assert w.scan(102.5) == []  # changed: the clock starts again
    assert w.scan(104.0) == []
    (ready,) = w.scan(104.6)
    assert ready.relpath == "a.dcm" and ready.size == 20
    w.mark_handled(ready)
    assert w.scan(200.0) == []


def test_names_used_while_writing_are_ignored(tmp_path: Path) -> None:
    for name in (".hidden.dcm", "a.dcm.part", "b.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".staging").mkdir()
    (tmp_path / ".staging" / "c.dcm").write_bytes(b"x")
    w = watcher(tmp_path, stable=0)
    assert w.scan(1.0) == []


def test_nested_folders_and_odd_names(tmp_path: Path) -> None:
    nested = tmp_path / "STUDY 1" / "série"
    nested.mkdir(parents=True)
    (nested / "IM 0001").write_bytes(b"x")
    (ready,) = watcher(tmp_path, stable=0).scan(1.0)
    assert ready.relpath == "STUDY 1/série/IM 0001"


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.dcm").write_bytes(b"x")
    root = tmp_path / "watch"
    root.mkdir()
    os.symlink(outside, root / "link-dir")
    os.symlink(outside / "secret.dcm", root / "link.dcm")
    ready = watcher(root, stable=0).scan(1.0)
    assert {(f.relpath, f.refused) for f in ready} == {
        ("link-dir", "symbolic link: not followed; copy the file in instead"),
        ("link.dcm", "symbolic link: not followed; copy the file in instead"),
    }


def test_handled_files_are_not_read_again_unless_replaced(tmp_path: Path) -> None:
    f = tmp_path / "a.dcm"
    f.write_bytes(b"x")
    st = f.stat()
    w = watcher(tmp_path, stable=0, handled={"a.dcm": (st.st_size, st.st_mtime_ns)})
    assert w.scan(1.0) == []
    f.write_bytes(b"replaced")
    assert [r.relpath for r in w.scan(2.0)] == ["a.dcm"]


def dataset(path: Path, **tags: object) -> Path:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientName = "SECRET^NAME"
    ds.Rows, ds.Columns = 4, 4
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("tags", "view"),
    [
        ({"ViewPosition": "PA"}, "frontal"),
        ({"ViewPosition": "AP"}, "frontal"),
        ({"ViewPosition": "LL"}, "lateral"),
        ({"SeriesDescription": "CHEST LAT"}, "lateral"),
        ({}, "unknown"),
        ({"ViewPosition": "RAO"}, "other"),
    ],
)
def test_header_view(tmp_path: Path, tags: dict, view: str) -> None:
    record = read_header(dataset(tmp_path / "a.dcm", **tags))
    assert record.view == view
    assert record.modality == "CR"


@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ({"SOPInstanceUID": None}, "missing SOPInstanceUID"),
        ({"StudyInstanceUID": None}, "missing StudyInstanceUID"),
        (
            {"StudyInstanceUID": "not a uid"},
            "malformed StudyInstanceUID (holds a character other than digits and dots)",
        ),
        ({"Modality": None}, "missing Modality"),
    ],
)
def test_header_rejects_with_reason(tmp_path: Path, tags: dict, reason: str) -> None:
    with pytest.raises(InputRejected) as info:
        read_header(dataset(tmp_path / "a.dcm", **tags))
    assert info.value.reason == reason
    assert "SECRET" not in str(info.value)


def test_other_modalities_and_non_images_are_skipped(tmp_path: Path) -> None:
    with pytest.raises(Skipped, match="modality MR is not triaged"):
        read_header(dataset(tmp_path / "mr.dcm", Modality="MR"))
    with pytest.raises(Skipped, match="without an image"):
        read_header(dataset(tmp_path / "sr.dcm", Rows=None, Columns=None))


@pytest.mark.parametrize("content", [b"", b"hello world", b"\0" * 200, b"DICM" * 100])
def test_garbage_is_rejected_not_raised(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage"
    path.write_bytes(content)
    with pytest.raises(InputRejected):
        read_header(path)
