"""Reading one DICOM file's header into an :class:`~edge_agent.store.InstanceRecord`.

Tolerant reader: slightly non-conforming files are accepted where the meaning is clear.
Anything that cannot be used raises :class:`InputRejected` (the file is broken) or
:class:`Skipped` (a valid object we do not triage: SR, presentation states, other
modalities). Reasons are short and never contain PHI.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from ..errors import InputRejected
from ..store import InstanceRecord, View

logger = logging.getLogger(__name__)

TRIAGED_MODALITIES = frozenset({"CR", "DX", "CT"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO"})
_LATERAL_WORD = re.compile(r"\blat(eral)?\b", re.IGNORECASE)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class Skipped(InputRejected):
    """A valid DICOM object that the agent does not triage."""


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _uid(ds: pydicom.Dataset, keyword: str, *, required: bool) -> str | None:
    value = _text(ds, keyword)
    if value is None:
        if required:
            raise InputRejected(f"missing {keyword}")
        return None
    value = value.rstrip("\0 ")
    if len(value) > 64 or not _UID.match(value):
        raise InputRejected(f"malformed {keyword}")
    return value


def classify_view(ds: pydicom.Dataset) -> View:
    """frontal (PA/AP), lateral, or unknown when nothing says (a frontal candidate)."""
    view = (_text(ds, "ViewPosition") or "").upper()
    if view in FRONTAL_VIEWS:
        return "frontal"
    if view in LATERAL_VIEWS:
        return "lateral"
    hints = [_text(ds, k) or "" for k in ("SeriesDescription", "ProtocolName", "ImageComments")]
    for item in ds.get("ViewCodeSequence") or []:
        hints.append(str(item.get("CodeMeaning", "")))
    if any(_LATERAL_WORD.search(h) for h in hints):
        return "lateral"
    if view:
        return "other"  # e.g. an oblique: not a frontal chest image
    return "unknown"


def read_header(path: Path) -> InstanceRecord:
    """Read the header only (no pixel data). Raises InputRejected / Skipped with a reason."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise InputRejected("not a DICOM file (no DICM preamble or unreadable header)") from exc
    except (EOFError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise InputRejected(f"unreadable DICOM header ({type(exc).__name__})") from exc
    except OSError as exc:
        raise InputRejected(f"cannot read file ({exc.strerror or type(exc).__name__})") from exc
    try:
        return header_from_dataset(ds)
    except InputRejected:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        # pydicom parses values lazily: a corrupt element fails only when it is read.
        raise InputRejected(f"corrupt DICOM element ({type(exc).__name__})") from exc


def header_from_dataset(ds: pydicom.Dataset) -> InstanceRecord:
    sop_class = _uid(ds, "SOPClassUID", required=False)
    if sop_class == "1.2.840.10008.1.3.10":
        raise Skipped("DICOMDIR (media directory), not an image")
    sop_uid = _uid(ds, "SOPInstanceUID", required=True)
    study_uid = _uid(ds, "StudyInstanceUID", required=True)
    assert sop_uid is not None and study_uid is not None
    modality = (_text(ds, "Modality") or "").upper()
    if not modality:
        raise InputRejected("missing Modality")
    if modality not in TRIAGED_MODALITIES:
        raise Skipped(f"modality {modality} is not triaged")
    # stop_before_pixels never reads Pixel Data itself; Rows/Columns mark any image IOD.
    if "Rows" not in ds or "Columns" not in ds:
        raise Skipped(f"{modality} object without an image (e.g. a report or presentation state)")
    accession = _text(ds, "AccessionNumber")
    return InstanceRecord(
        sop_instance_uid=sop_uid,
        study_instance_uid=study_uid,
        series_instance_uid=_uid(ds, "SeriesInstanceUID", required=False),
        modality=modality,
        view=classify_view(ds),
        accession_number=accession,
    )
