"""Waiting in tests for something another thread, process or broker does."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    condition: Callable[[], bool], timeout: float = 5.0, what: str = "", *, poll: float = 0.05
) -> None:
    """Return once ``condition()`` is true; AssertionError naming ``what`` after ``timeout``
    seconds. ``poll``: seconds between checks (more for a costly condition)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(poll)
