"""Reading one DICOM file's header into an :class:`~edge_agent.store.InstanceRecord`.

Tolerant reader: slightly non-conforming files are accepted where the meaning is clear.
Anything that cannot be used raises :class:`InputRejected` (the file is broken) or
:class:`Skipped` (a valid object we do not triage: DICOMDIR, SR and key object selections,
presentation states, RT objects and other non-image SOP classes, recognised by SOP class
before anything else is asked of them; other modalities; objects without an image).
Reasons are short and never contain PHI.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pydicom
from pydicom.uid import UID

from ..dicom.errors import reading
from ..dicom.instance_file import Seen, read_dataset
from ..dicom.uid import UID_PADDING, uid_problem, valid_uid
from ..errors import InputRejected
from ..store import InstanceRecord, View

logger = logging.getLogger(__name__)

TRIAGED_MODALITIES = frozenset({"CR", "DX", "CT"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO"})
_LATERAL_WORD = re.compile(r"\blat(eral)?\b", re.IGNORECASE)


# Storage SOP classes that carry no image to triage (PS3.6 Annex A), by UID root: an exact
# match or the root followed by "." matches. RT Image and RT Dose hold pixel data but are
# not radiographs, so all of RT is skipped.
NON_IMAGE_SOP_CLASSES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.1.3.10", "DICOMDIR (media directory)"),
    ("1.2.840.10008.5.1.4.1.1.88", "structured report or key object selection"),
    ("1.2.840.10008.5.1.4.1.1.11", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.481", "radiotherapy object"),
    ("1.2.840.10008.5.1.4.34", "radiotherapy or workflow object"),
    ("1.2.840.10008.5.1.4.1.1.104", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.9", "waveform"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data, registration, fiducials or segmentation"),
    ("1.2.840.10008.5.1.4.1.1.67", "real world value mapping"),
    ("1.2.840.10008.5.1.4.1.1.68", "surface"),
    ("1.2.840.10008.5.1.4.1.1.82", "ophthalmic map"),
    ("1.2.840.10008.5.1.4.1.1.90", "content assessment"),
    ("1.2.840.10008.5.1.4.1.1.200", "protocol"),
    ("1.2.840.10008.5.1.4.38", "hanging protocol"),
    ("1.2.840.10008.5.1.4.39", "colour palette"),
    ("1.2.840.10008.5.1.4.43", "implant template"),
    ("1.2.840.10008.5.1.4.44", "implant assembly template"),
    ("1.2.840.10008.5.1.4.45", "implant template group"),
)

# Image storage SOP classes of the modalities we triage (CR, DX for presentation and
# processing, CT and enhanced/legacy CT): without a Modality these are broken, not foreign.
TRIAGED_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.2.2",
    }
)


class Skipped(InputRejected):
    """A valid DICOM object that the agent does not triage."""


def non_image_kind(sop_class_uid: str | None) -> str | None:
    """What kind of non-image object ``sop_class_uid`` is, or None for (possible) images."""
    if not sop_class_uid:
        return None
    for root, kind in NON_IMAGE_SOP_CLASSES:
        if sop_class_uid == root or sop_class_uid.startswith(root + "."):
            return kind
    return None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _uid(ds: pydicom.Dataset, keyword: str, *, required: bool) -> str | None:
    """The element's UID under the one rule (:mod:`edge_agent.dicom.uid`), padding removed.
    Missing or empty: None, or InputRejected when ``required``; malformed: InputRejected,
    with a reason that never quotes the value."""
    value = ds.get(keyword)
    if value is None or not str(value).strip(UID_PADDING):
        if required:
            raise InputRejected(f"missing {keyword}")
        return None
    problem = uid_problem(value)
    if problem is not None:
        raise InputRejected(f"malformed {keyword} ({problem})")
    return valid_uid(value)


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


def read_header(
    path: Path | str, *, root: Path | None = None, seen: Seen | None = None
) -> InstanceRecord:
    """Read the header only (no pixel data). Raises InputRejected / Skipped with a reason.

    ``path`` is relative to ``root`` (or, without ``root``, a file in its folder), opened as
    :func:`~edge_agent.dicom.instance_file.open_instance` does: links are never followed,
    only a regular file is read and, with ``seen``, only the one the watcher saw. An error
    of the operating system raises :class:`FileUnreadable` (the intake retries it)."""
    if root is None:
        root, path = Path(path).parent, Path(path).name
    with reading(
        "unreadable DICOM header ({error})",
        not_dicom="not a DICOM file (no DICM preamble or unreadable header)",
    ):
        ds = read_dataset(root, path, pixels=False, seen=seen)
    # pydicom parses values lazily: a corrupt element fails only when it is read.
    with reading("corrupt DICOM element ({error})"):
        return header_from_dataset(ds)


def _sop_class(ds: pydicom.Dataset) -> str | None:
    """SOPClassUID, or the file meta's MediaStorageSOPClassUID (all a DICOMDIR has); a
    malformed SOPClassUID is rejected, a malformed media storage class is ignored."""
    sop_class = _uid(ds, "SOPClassUID", required=False)
    if sop_class is None:
        meta = getattr(ds, "file_meta", None)
        sop_class = valid_uid(meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return sop_class


def _sop_class_name(sop_class: str) -> str:
    name = UID(sop_class).name  # the registered name, or the UID itself: never PHI
    return name if len(name) <= 80 else sop_class


def header_from_dataset(ds: pydicom.Dataset) -> InstanceRecord:
    sop_class = _sop_class(ds)
    kind = non_image_kind(sop_class)
    if kind is not None:
        assert sop_class is not None
        if sop_class == "1.2.840.10008.1.3.10":
            raise Skipped("DICOMDIR (media directory), not an image")
        raise Skipped(f"{kind}, not an image ({_sop_class_name(sop_class)})")
    sop_uid = _uid(ds, "SOPInstanceUID", required=True)
    study_uid = _uid(ds, "StudyInstanceUID", required=True)
    assert sop_uid is not None and study_uid is not None
    modality = (_text(ds, "Modality") or "").upper()
    if not modality:
        if sop_class is not None and sop_class not in TRIAGED_SOP_CLASSES:
            # Tolerant: a foreign object that lacks Modality is still not ours to judge.
            raise Skipped(f"no Modality; {_sop_class_name(sop_class)} is not triaged")
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
