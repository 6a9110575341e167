"""The rule for DICOM UIDs that come from outside (a file, a C-STORE peer, a CSV) and end up
in names (file names, MQTT topic levels). Every place that takes such a UID asks here;
nothing else decides.

**UID** (PS3.5 9.1, read tolerantly): after removing padding, the whole value is one or more
components of ASCII digits separated by single dots, at most 64 characters. Padding is
spaces and NULs at either end (writers pad UIDs to an even length with a NUL, some with a
space; pydicom, reading a file, already strips trailing whitespace and one NUL, and the
rule applies to what it read). Nothing else is removed: a newline, tab, any other control
character or any other character anywhere makes the value malformed, because a UID
becomes a file name and an MQTT topic level. Leading zeros in a
component (``1.2.03``) are not allowed by the standard but real scanners write them: they
are accepted unchanged, since the UID is an identity and rewriting it would make another.

Reasons given by :func:`uid_problem` never quote the value: it came from outside and may
be anything, including patient data written into the wrong element.
"""

from __future__ import annotations

import re
from typing import Any

UID_MAX_LENGTH = 64
UID_PADDING = " \0"
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def uid_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable UID (a short phrase without the value), or None."""
    if value is None:
        return "missing"
    text = str(value).strip(UID_PADDING)
    if not text:
        return "empty"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return "holds a control character"
    if len(text) > UID_MAX_LENGTH:
        return f"longer than {UID_MAX_LENGTH} characters"
    if _UID.fullmatch(text) is None:
        if text.strip("0123456789.") == "":
            return "has an empty component"
        return "holds a character other than digits and dots"
    return None


def valid_uid(value: Any) -> str | None:
    """The UID without its padding when ``value`` is a usable UID, else None."""
    if uid_problem(value) is not None:
        return None
    return str(value).strip(UID_PADDING)
