"""Text from outside, made safe to log, store and print: the one place that escapes it.

A value that came from a peer (a file or folder name, an ack's fields, a topic) may hold
newlines that would forge a log line, ANSI escape sequences that rewrite a terminal, bidi
overrides that reorder what a person reads, or megabytes. :func:`escape_controls` writes
every such character out (``\\x1b``, ``\\n``, ``\\u202e`` …); the log formatters
(``logs.py``) and ``edge-agent status`` use it for everything they show, and
:func:`printable` bounds the length as well, for values that may be huge.
"""

from __future__ import annotations

import unicodedata

# Characters shown escaped: controls (C0, DEL, C1 such as CSI), format characters (bidi
# overrides and the like), line and paragraph separators, and lone surrogates (names that
# were not UTF-8).
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    if unicodedata.category(c) not in _ESCAPED_CATEGORIES:
        return c
    if c in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[c]
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control or invisible formatting character written out: safe to
    print on a terminal or in a one-line log record. ``keep_newlines`` leaves line breaks
    (a traceback's). Display only: a backslash is not doubled, so the escaped text is not
    meant to be parsed back."""
    if text.isprintable():
        return text  # the usual case, without a look at each character
    if keep_newlines:
        return "\n".join(escape_controls(line) for line in text.split("\n"))
    return "".join(_escape_char(c) for c in text)


def has_control(text: str) -> bool:
    """True when ``text`` holds a character :func:`escape_controls` would write out."""
    return not text.isprintable() and any(_escape_char(c) != c for c in text)


def printable(text: str, limit: int = 200) -> str:
    """``text`` escaped as :func:`escape_controls` does, cut to ``limit`` characters of the
    result with ``…(N chars)`` saying how long the original was."""
    escaped = escape_controls(text[: limit * 4 + 1])
    if len(escaped) <= limit and len(text) <= limit * 4:
        return escaped
    return f"{escaped[:limit]}…({len(text)} chars)"
