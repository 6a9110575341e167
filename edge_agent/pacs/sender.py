"""The PACS sender: a child process that reads a result's source headers, builds its SR and
C-STOREs it, so that none of that holds the agent's interpreter lock.

Building an SR is pure Python (highdicom's checks, ~40 ms) and so is encoding it (pydicom,
~13 ms). In a thread of the agent it holds the interpreter lock, and every other Python
thread (the MQTT publisher's, paho's, scoring's) waits up to Python's switch interval (5 ms)
each time it wants the lock back; a niced thread is worse, not better: preempted while it
holds the lock, it keeps the agent's threads waiting for as long as the kernel keeps it off
the CPU (priority inversion). Measured with a thread that sleeps 2 ms in a loop while SRs are
built back to back: 10 ms late at the median beside a building thread (p99 18 ms; niced:
p99 34 ms, max 466 ms), 0.1 ms beside a building process (docs/benchmarks.md).

So the PACS worker's thread only reads the outbox and commits outcomes; :class:`Sender`
hands each row to one child process (``spawn``: nothing of the agent's threads is copied),
which runs :data:`NICE` steps below the agent and keeps one association open while rows
are waiting (:class:`~edge_agent.pacs.scu.Session`). Only PHI-free values cross: the stored
result, the source files' paths (relative to the watch folder) and UIDs, and an
:class:`Outcome` back. The child logs as the agent does (``edge_agent.cli.setup_logging``:
the journal or stderr, pydicom's records dropped) at the agent's level; pynetdicom's own
records of a failure only at DEBUG, since the worker's line says how each attempt ended.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from ..bundle import Concept
from ..config import PacsSettings
from ..dicom.instance_file import Rereading, read_again
from ..errors import InputRejected, describe
from ..priority import lower_process_priority
from ..results import StudyResult
from .scu import PacsError, Peer, Session

# highdicom (edge_agent.pacs.sr) is imported where an SR is built, in the sender process: the
# agent's process does not load it (~50 MB with the code tables it reads on first use).

logger = logging.getLogger(__name__)

NICE = 10
"""Nice steps added to the sender process's value (Linux; relative, at most 19); with a
positive value its threads also run under ``SCHED_IDLE`` (0: the agent's priority, for the
benchmark's comparison)."""

REREADING = Rereading(
    gone="a scored image is no longer in the watch folder",
    replaced="a scored image was replaced by another instance",
    unreadable="a scored image is no longer readable ({error})",
)
"""What a scored image read again for the SR can have become (``pacs_last_error``)."""


@dataclass(frozen=True)
class Job:
    """One row's attempt: the stored result and its sources (path relative to the watch
    folder, SOP Instance UID)."""

    alert_id: str
    payload: bytes
    sources: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Outcome:
    """Stored, or why not (``reason``, for the log and the status: PHI-free)."""

    stored: bool
    reason: str | None = None


def read_sources(watch_dir: Path, sources: tuple[tuple[str, str], ...]) -> list[Dataset]:
    """The headers of ``sources`` read again (pixels left out), checked to be the instances
    recorded; a file gone or replaced is an :class:`~edge_agent.errors.InputRejected`."""
    return [read_again(watch_dir, p, uid, REREADING, pixels=False) for p, uid in sources]


def build(
    result: StudyResult,
    sources: list[Dataset],
    concepts: Mapping[str, Concept | None],
    agent: str,
) -> Dataset:
    """The SR of ``result``; anything that keeps it from being built is an SRError (the
    row is kept and retried, never lost to a header highdicom refuses)."""
    from .sr import SRError, build_sr

    try:
        return build_sr(result, sources, concepts=concepts, agent=agent)
    except (SRError, InputRejected):
        raise
    except Exception as exc:
        logger.exception("PACS: the SR cannot be built")
        raise SRError(f"SR not built: {describe(exc)}") from exc


# -- the child process ----------------------------------------------------------------------


@dataclass
class _Child:
    session: Session
    concepts: dict[str, Concept | None]
    agent: str
    watch_dir: Path


_child: _Child | None = None


def _start(
    settings: PacsSettings,
    concepts: dict[str, Concept | None],
    agent: str,
    watch_dir: Path,
    nice: int,
    log_level: int,
) -> None:
    """The child's initializer: the agent's logging at the agent's level, its priority
    (pynetdicom's threads, started later, inherit it), its session."""
    from ..cli import setup_logging

    global _child
    setup_logging(logging.getLevelName(log_level), dicom_client_only=True)
    lower_process_priority(nice, "PACS sender", idle=nice > 0)
    threading.Thread(target=_follow_parent, args=(os.getppid(),), daemon=True).start()
    _child = _Child(Session(Peer.from_settings(settings)), concepts, agent, watch_dir)


def _follow_parent(parent: int) -> None:
    """End this process when the agent is gone (SIGKILL, a crash): nothing else would, and
    a sender left behind would hold its memory and perhaps an association."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _send(job: Job) -> Outcome:
    from .sr import SRError

    assert _child is not None, "the initializer runs first"
    child = _child
    try:
        result = StudyResult.model_validate_json(job.payload)
        sr = build(result, read_sources(child.watch_dir, job.sources), child.concepts, child.agent)
        child.session.store(sr)
    except PacsError as exc:
        return Outcome(False, exc.reason)
    except (SRError, InputRejected) as exc:
        return Outcome(False, str(exc))
    except Exception as exc:  # the row is kept and retried after its back-off, not lost
        logger.exception("PACS: result %s not sent", job.alert_id)
        return Outcome(False, f"PACS sender: {describe(exc)}")
    return Outcome(True)


def _release() -> int:
    """Release the association, if open; the child's pid."""
    assert _child is not None, "the initializer runs first"
    _child.session.close()
    return os.getpid()


# -- the agent's side -----------------------------------------------------------------------


class Sender:
    """The agent's handle on the child process: started at the first :meth:`send`, started
    again after it died. Not thread-safe: one owner (the PACS worker)."""

    def __init__(
        self,
        settings: PacsSettings,
        *,
        concepts: Mapping[str, Concept | None],
        agent: str,
        watch_dir: Path,
        nice: int = NICE,
    ) -> None:
        level = logging.getLogger().getEffectiveLevel()
        self._args = (settings, dict(concepts), agent, watch_dir, nice, level)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pid: int | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start,
                initargs=self._args,
            )
            self._pid = int(self._pool.submit(_release).result())
        return self._pool

    def send(self, job: Job, stop: threading.Event | None = None) -> Outcome | None:
        """One attempt for ``job``: the child's outcome, a failure when it died with it, or
        None when ``stop`` was set meanwhile (the child is killed: the agent's shutdown does
        not wait for a slow PACS; the row was not attempted as far as its state goes)."""
        try:
            future = self._executor().submit(_send, job)
        except BrokenProcessPool:  # it died while idle: a new one, and the job goes on
            self._drop()
            future = self._executor().submit(_send, job)
        while True:
            try:
                return future.result(timeout=0.25)
            except concurrent.futures.TimeoutError:
                if stop is not None and stop.is_set():
                    self.kill()
                    return None
            except BrokenProcessPool:
                self._drop()
                return Outcome(False, "the PACS sender process ended unexpectedly")

    def start(self) -> int:
        """Start the child now (it is otherwise started by the first :meth:`send`); its pid."""
        self._executor()
        assert self._pid is not None
        return self._pid

    def kill(self) -> None:
        """End the child at once (SIGKILL): what it was sending is sent again later."""
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
        self._drop()

    def release(self) -> int | None:
        """Release the child's association, if open; the child's pid (None: not running)."""
        if self._pool is None:
            return None
        try:
            return self._pool.submit(_release).result()
        except BrokenProcessPool:
            self._drop()
            return None

    def close(self) -> None:
        """Release the association and end the child."""
        self.release()
        self._drop()

    def _drop(self) -> None:
        pool, self._pool, self._pid = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
