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


def lower_thread_priority(steps: int, what: str, tid: int | None = None) -> int | None:
    """Add ``steps`` to the nice value of thread ``tid`` of this process (default: the
    calling thread), at most 19; the new value, or None when the platform does not allow it
    (logged as a warning naming ``what``)."""
    if steps <= 0:
        return None
    try:
        me = threading.get_native_id() if tid is None else tid
        value = min(19, os.getpriority(os.PRIO_PROCESS, me) + steps)
        os.setpriority(os.PRIO_PROCESS, me, value)
    except (OSError, AttributeError) as exc:  # not Linux, or not allowed
        logger.warning("%s: could not lower the CPU priority: %s", what, exc)
        return None
    return value


def lower_process_priority(steps: int, what: str, *, idle: bool = False) -> None:
    """:func:`lower_thread_priority` for every thread this process has now (libraries start
    some at import: OpenBLAS's pool); threads started later inherit the caller's value.

    ``idle``: also put them under ``SCHED_IDLE`` (Linux), which runs only when no other
    thread of the box wants the core, and is preempted at once when one wakes up; nice
    alone leaves the woken thread waiting for the kernel's wake-up granularity. No
    privilege is needed to enter it (leaving it needs one); a platform that refuses keeps
    the nice value."""
    try:
        threads = [int(name) for name in os.listdir("/proc/self/task")]
    except (OSError, ValueError):  # no procfs: the calling thread alone
        threads = [threading.get_native_id()]
    for tid in threads:
        lower_thread_priority(steps, what, tid)
        if idle:
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except (OSError, AttributeError) as exc:  # not Linux, or not allowed
                logger.warning("%s: could not set the idle CPU scheduling: %s", what, exc)
                idle = False
