"""edge_agent/dicom/errors.py: the one table of what pydicom and the decoders raise, and the
``reading`` context manager every DICOM read goes through."""

from __future__ import annotations

import ast
import struct
import zlib
from pathlib import Path

import pytest
from pydicom.errors import BytesLengthException, InvalidDicomError

from edge_agent import narrative, scoring
from edge_agent.dicom.errors import MAPPED, MAPPED_TYPES, MESSAGE_LIMIT, failure_name, reading
from edge_agent.dicom.instance_file import read_again
from edge_agent.errors import ImageRejected, InputRejected

ROOT = Path(__file__).parent.parent


def test_the_table_holds_every_type_the_call_sites_caught() -> None:
    """The union of the tuples the header reader, imaging, CT, scoring, narrative, the SCP
    and probe each kept before there was one table: none is lost."""
    caught_before = {
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        OverflowError,
        IndexError,
        NotImplementedError,
        RuntimeError,
        struct.error,
        zlib.error,
        BytesLengthException,
        InvalidDicomError,
    }
    assert set(MAPPED) == caught_before
    assert all(isinstance(meaning, str) and meaning for meaning in MAPPED.values())


@pytest.mark.parametrize("kind", MAPPED_TYPES, ids=lambda t: t.__name__)
def test_each_mapped_type_becomes_a_rejection_naming_its_type(kind: type[Exception]) -> None:
    original = kind("DOE^JANE 19700101")
    with (
        pytest.raises(ImageRejected) as info,
        reading("bad ({error})", rejected=ImageRejected),
    ):
        raise original
    assert info.value.reason == f"bad ({kind.__name__})"  # the message is never quoted
    assert info.value.__cause__ is original


def test_not_dicom_has_its_own_reason_and_a_reason_without_error_is_used_as_is() -> None:
    with pytest.raises(InputRejected) as info, reading("bad ({error})", not_dicom="not DICOM"):
        raise InvalidDicomError("no preamble")
    assert type(info.value) is InputRejected and info.value.reason == "not DICOM"
    with pytest.raises(InputRejected) as info, reading("malformed Rows"):
        int("x")
    assert info.value.reason == "malformed Rows"


def test_the_message_is_quoted_only_when_asked_and_cut() -> None:
    with pytest.raises(InputRejected) as info, reading("LUT: {message}"):
        raise ValueError("Window\n  Width " + "x" * 500)
    assert info.value.reason == "LUT: " + ("Window Width " + "x" * 500)[:MESSAGE_LIMIT]


@pytest.mark.parametrize(
    "exc",
    [
        OSError(5, "I/O error"),  # the intake retries these
        PermissionError(13, "denied"),
        LookupError("a bug of ours"),
        ZeroDivisionError(),
        KeyboardInterrupt(),
        InputRejected("already worded"),
        ImageRejected("already worded"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_anything_else_passes_through_unchanged(exc: BaseException) -> None:
    with pytest.raises(type(exc)) as info, reading("unreadable ({error})"):
        raise exc
    assert info.value is exc


def test_a_decoder_panic_is_mapped_by_name() -> None:
    """pyo3_runtime.PanicException cannot be imported; it is a BaseException."""
    panic = type("PanicException", (BaseException,), {})
    assert failure_name(panic("boom")) == "decoder panic"
    expected = pytest.raises(ImageRejected, match=r"^decode \(decoder panic\)$")
    with expected, reading("decode ({error})", rejected=ImageRejected):
        raise panic("boom")


def test_a_file_no_longer_dicom_is_a_reason_for_the_narrative_too(tmp_path: Path) -> None:
    """The narrative's read once listed pydicom's errors without InvalidDicomError: an image
    replaced by a non-DICOM file escaped as a crash with a traceback."""
    (tmp_path / "image.dcm").write_bytes(b"not DICOM at all" * 10)
    with pytest.raises(InputRejected) as info:
        read_again(tmp_path, "image.dcm", None, narrative.REREADING)
    assert info.value.reason == "the image is no longer readable (InvalidDicomError)"
    with pytest.raises(InputRejected) as info:
        read_again(tmp_path, "image.dcm", None, scoring.REREADING)
    assert info.value.reason == "not a DICOM file any more (replaced before scoring)"
    with pytest.raises(InputRejected) as info:
        read_again(tmp_path, "gone.dcm", None, narrative.REREADING)
    assert info.value.reason == "the image is no longer in the watch folder"


def _lists_of_mapped_types(path: Path) -> list[int]:
    """Lines where ``path`` spells out a tuple of four or more of the mapped types."""
    names = {t.__name__ for t in MAPPED_TYPES} | {"error"}  # struct.error, zlib.error
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Tuple):
            spelled = [
                e.id if isinstance(e, ast.Name) else e.attr if isinstance(e, ast.Attribute) else ""
                for e in node.elts
            ]
            if sum(name in names for name in spelled) >= 4:
                lines.append(node.lineno)
    return lines


def test_no_module_keeps_its_own_list_of_what_pydicom_raises() -> None:
    found = {
        str(path.relative_to(ROOT)): lines
        for package in ("edge_agent", "export")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "errors.py" and (lines := _lists_of_mapped_types(path))
    }
    assert found == {}


def test_a_transfer_syntax_that_is_no_uid_is_not_quoted() -> None:
    """The decoder's reason named the transfer syntax by ``UID.name``, which for an
    unregistered value is the value itself: text from the file, quoted on P/rejected."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset

    from edge_agent.imaging import decode_pixels

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "DOE^JANE 19700101"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = 2, 2, 16, 12
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = np.arange(4, dtype=np.uint16).tobytes()
    with pytest.warns(UserWarning), pytest.raises(ImageRejected) as info:
        decode_pixels(ds)
    assert "DOE" not in info.value.reason
    assert info.value.reason.startswith("cannot decode pixel data (malformed transfer syntax UID)")
