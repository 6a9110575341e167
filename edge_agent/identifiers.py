"""The rules for identifiers that come from outside and end up in names: MQTT topic segments
and file ids here; DICOM UIDs follow :mod:`edge_agent.dicom.uid`. Every place that builds a
topic asks here; nothing else decides.

**Topic segment** (``site``, ``device_id``, each level of ``mqtt.topic_prefix``): one or
more of ``A-Z a-z 0-9 _ -``, the whole value. A topic level that is a UID (``P/study/<UID>``)
follows the UID rule, which admits digits and dots only. Either way a topic never holds a
wildcard, a ``/`` inside a level, a control character or non-ASCII text, which a broker may
answer by dropping the connection.

**File id**: what ``P/rejected`` says instead of a path (a folder may be named after the
patient). A keyed hash (HMAC-SHA256, 16 hex digits) of the path as the state database
records it, under a random key kept in that database (``meta``, :data:`FILE_ID_KEY`): the
same file always has the same id on this box, ``edge-agent status --file ID`` finds the path
again, and without the key the id says nothing about the path, however guessable.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from .dicom.uid import valid_uid

__all__ = [
    "FILE_ID_KEY",
    "FILE_ID_LENGTH",
    "SEGMENT_CHARS",
    "file_id",
    "is_file_id",
    "is_topic_segment",
    "topic",
    "topic_prefix",
    "topic_segment",
]
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
SEGMENT_CHARS = "letters, digits, '_' and '-'"
FILE_ID_KEY = "file_id_key"
"""The ``meta`` key of the state database's file-id key."""
FILE_ID_LENGTH = 16


def is_topic_segment(value: str) -> bool:
    return _SEGMENT.fullmatch(value) is not None


def topic_segment(value: str) -> str:
    """``value`` if it is a topic segment, else ValueError (for config validators)."""
    if not is_topic_segment(value):
        raise ValueError(f"must be one or more of {SEGMENT_CHARS} (a single topic level)")
    return value


def topic_prefix(value: str) -> str:
    """``value`` if it is topic segments joined by '/', else ValueError."""
    if not all(is_topic_segment(level) for level in value.split("/")):
        raise ValueError(
            f"must be topic levels of {SEGMENT_CHARS}, separated by single '/' "
            "(no wildcards, no leading or trailing '/', no other characters)"
        )
    return value


def topic(base: str, *levels: str) -> str:
    """``base/level/…``; ``base`` must be a checked prefix, each level a topic segment or a
    UID. ValueError (naming the level's position, not its text) otherwise."""
    topic_prefix(base)
    for n, level in enumerate(levels, 1):
        if not is_topic_segment(level) and valid_uid(level) != level:
            raise ValueError(f"topic level {n} after {base} is neither a topic segment nor a UID")
    return "/".join((base, *levels))


def file_id(key: bytes, path: str) -> str:
    """The id of the file recorded as ``path`` (see the module's docstring)."""
    data = path.encode("utf-8", "surrogateescape")
    return hmac.new(key, data, hashlib.sha256).hexdigest()[:FILE_ID_LENGTH]


def is_file_id(text: str) -> bool:
    return len(text) == FILE_ID_LENGTH and all(c in "0123456789abcdef" for c in text)
