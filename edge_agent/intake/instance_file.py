"""Moved to :mod:`edge_agent.dicom.instance_file`; these names stay importable from here."""

from ..dicom.instance_file import (
    FileChanged,
    FileGone,
    FileProblem,
    FileUnreadable,
    NotRegularFile,
    OtherInstance,
    Seen,
    open_instance,
    read_dataset,
    refusal,
)

__all__ = [
    "FileChanged",
    "FileGone",
    "FileProblem",
    "FileUnreadable",
    "NotRegularFile",
    "OtherInstance",
    "Seen",
    "open_instance",
    "read_dataset",
    "refusal",
]
