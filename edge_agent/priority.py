"""A thread's CPU priority, lowered for work that must yield to scoring and MQTT delivery.

Linux schedules threads, and its nice value is per thread: a thread can raise its own
(``setpriority`` on its native id) without privileges, and threads it creates afterwards
inherit the value. The steps are added to the thread's current value, so an agent started
with ``Nice=5`` keeps the lowered thread that many steps below its other threads (an
absolute value could even raise its priority).
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)


def lower_thread_priority(steps: int, what: str) -> int | None:
    """Add ``steps`` to the calling thread's nice value (at most 19); the new value, or None
    when the platform does not allow it (logged as a warning naming ``what``)."""
    if steps <= 0:
        return None
    try:
        me = threading.get_native_id()
        value = min(19, os.getpriority(os.PRIO_PROCESS, me) + steps)
        os.setpriority(os.PRIO_PROCESS, me, value)
    except (OSError, AttributeError) as exc:  # not Linux, or not allowed
        logger.warning("%s: could not lower the CPU priority: %s", what, exc)
        return None
    return value
