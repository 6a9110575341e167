"""What the daemon's threads share besides the SQLite store, all named here.

The threads: ``intake`` and ``scoring`` (this package), ``narrative``
(:class:`edge_agent.narrative.NarrativeWorker`), ``health``
(:class:`edge_agent.health.HealthMonitor`), the publisher's drain thread and paho's network
thread (:mod:`edge_agent.mqtt`), the C-STORE association threads
(:mod:`edge_agent.intake.scp`) and the main thread (:class:`edge_agent.service.Agent`:
start, watchdog, re-notifications, health watch, stop).

Every study, result, narrative job and outbox row goes from one thread to the next through
the store. Besides it, exactly these cross a thread:

================  ================================  =====================  ===================
what              where                             written by             read by
================  ================================  =====================  ===================
stop              :attr:`Shared.stop`               main (``stop()``)      every worker
complete studies  :attr:`Shared.studies`            intake; main at start  scoring
scoring idle      :attr:`Shared.scoring_idle`       scoring                narrative (per token)
last errors       :attr:`Shared.errors`             each its own slot      status (drain, paho)
intake heartbeat  ``IntakeWorker.stall()``          intake                 main (health watch)
intake pause      ``HealthMonitor.intake_paused``   health                 intake
waiting studies   ``ScoringWaits`` (waiting.py)     scoring                status
narrative error   ``NarrativeWorker.last_error``    narrative              status
delivery state    ``Publisher`` (its own lock)      drain, paho            main, status
wake-ups          ``wake()`` of publisher,          whoever committed      the woken thread
                  narrative, folder watcher         work for it
================  ================================  =====================  ===================

Each of them is either a ``threading.Event``, behind a lock of its own, or a single
reference replaced whole (the heartbeat tuple, the health state), read without a lock.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Shared", "StudyQueue", "WorkerErrors"]

Slot = Literal["start", "intake", "scoring", "main"]
"""Whose error: the start (a damaged database set aside), a worker, or the main thread
(health watch, re-notifications)."""


class StudyQueue:
    """Complete studies waiting to be scored, each queued at most once until taken (the
    intake finds a study complete again while it still waits: one entry)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._lock = threading.Lock()

    def put(self, uid: str) -> None:
        with self._lock:
            if uid in self._queued:
                return
            self._queued.add(uid)
        self._queue.put(uid)

    def get(self, timeout: float) -> str | None:
        """The next study, or None after ``timeout`` seconds."""
        try:
            uid = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._lock:
            self._queued.discard(uid)
        return uid


class WorkerErrors:
    """The latest error of each thread, in a slot of its own (``intake``, ``scoring``,
    ``main``, ``start``): a slot is written by its thread only. The status's ``last_error``
    is the newest of them, composed when it is read (:meth:`latest`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._order = itertools.count()
        self._slots: dict[Slot, tuple[int, str]] = {}

    def set(self, worker: Slot, error: str) -> None:
        with self._lock:
            self._slots[worker] = (next(self._order), error)

    def get(self, worker: Slot) -> str | None:
        with self._lock:
            slot = self._slots.get(worker)
        return None if slot is None else slot[1]

    def latest(self) -> str | None:
        """The most recently set error of any thread, or None."""
        with self._lock:
            newest = max(self._slots.values(), default=None)
        return None if newest is None else newest[1]


def _idle() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class Shared:
    """The shared things of the table above that have no other owner."""

    stop: threading.Event = field(default_factory=threading.Event)
    studies: StudyQueue = field(default_factory=StudyQueue)
    scoring_idle: threading.Event = field(default_factory=_idle)
    """Clear while the scoring thread scores a study (the narrative waits); set otherwise."""
    errors: WorkerErrors = field(default_factory=WorkerErrors)
