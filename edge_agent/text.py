"""Text from outside, made safe to log, store and print.

A value that came from a peer (an ack's fields, a topic) may hold newlines that would forge
a log line, ANSI escape sequences that rewrite a terminal, or megabytes. :func:`printable`
escapes every control character (C0, DEL, C1, and the Unicode line and paragraph
separators) the way Python writes it in a string literal and bounds the length, so what
reaches a log line or ``edge-agent status`` is one line of visible text.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, and the two separators str.splitlines() also breaks on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def has_control(text: str) -> bool:
    """True when ``text`` holds a character :func:`printable` would escape."""
    return _CONTROL.search(text) is not None


def printable(text: str, limit: int = 200) -> str:
    """``text`` with control characters escaped (``\\n`` → ``\\x0a``), cut to ``limit``
    characters of the result with ``…(N chars)`` saying how long the original was."""
    escaped = _CONTROL.sub(_escape, text[: limit * 4 + 1])
    if len(escaped) <= limit and len(text) <= limit * 4:
        return escaped
    return f"{escaped[:limit]}…({len(text)} chars)"
