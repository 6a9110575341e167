"""The intake worker: files from the watch folder (and the C-STORE receiver's folder) into
the store; complete studies onto the scoring queue."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..dicom.instance_file import FileChanged, FileGone, FileUnreadable, NotRegularFile
from ..errors import EdgeTriageError, InputRejected, describe
from ..intake.header import Skipped, read_header
from ..intake.scp import ReceivedFolder
from ..intake.watcher import FolderWatcher, ReadyFile
from ..store import Store
from .naming import Naming
from .shared import Shared

logger = logging.getLogger(__name__)


class IntakeWorker:
    """The ``intake`` thread (:meth:`run`).

    Reads: the watch folder (``watcher``), the received folder, ``paused`` (the health
    thread's verdict on the state disk), ``shared.stop``. Writes: the store (instances,
    files, studies complete), ``shared.studies``, its slot ``intake`` of ``shared.errors``
    and its heartbeat (read by the main thread through :meth:`stall`); wakes the publisher
    (``published``) when it commits a ``P/rejected`` message.
    """

    name = "intake"

    def __init__(
        self,
        store: Store,
        watcher: FolderWatcher,
        received: ReceivedFolder | None,
        naming: Naming,
        shared: Shared,
        *,
        poll_interval: float,
        stall_seconds: float,
        quiet_seconds: float,
        paused: Callable[[], str | None],
        published: Callable[[], None],
    ) -> None:
        self.store = store
        self.watcher = watcher
        self.received = received
        self.naming = naming
        self.shared = shared
        self.poll_interval = poll_interval
        self.stall_seconds = stall_seconds
        self.quiet_seconds = quiet_seconds
        self.paused = paused
        self.published = published
        # The heartbeat: what the intake is doing and since when (monotonic), None while it
        # waits for files. A step that takes longer than intake.stall_seconds (a read from a
        # hung network mount) makes the agent NOT HEALTHY (:meth:`stall`). Replaced whole.
        self._step: tuple[str, float] | None = None

    def on_received(self, path: Path) -> None:
        """The SCP stored an instance (an association thread): wake the intake."""
        assert self.received is not None
        self.received.stored(path)
        self.watcher.wake()

    def stall(self) -> str | None:
        """Why the intake is stuck (one step over ``intake.stall_seconds``), or None."""
        step = self._step
        if step is None:
            return None
        doing, since = step
        took = time.monotonic() - since
        if took <= self.stall_seconds:
            return None
        return f"intake stuck for {took:.0f} s {doing}"

    def _beat(self, doing: str | None) -> None:
        """The intake starts ``doing`` (None: it waits for files)."""
        self._step = None if doing is None else (doing, time.monotonic())

    # -- the thread -------------------------------------------------------------------------

    def run(self) -> None:
        stop = self.shared.stop
        self.watcher.start()  # inotify or polling; logs which and why
        try:
            while not stop.is_set():
                if self.paused():  # state disk below its floor; logged by health
                    stop.wait(self.poll_interval)
                    continue
                more = failed = False
                try:
                    more = self._step_once()
                except EdgeTriageError as exc:
                    self.shared.errors.set("intake", str(exc))
                    failed = True
                    logger.error("intake: %s", exc)
                except Exception as exc:
                    # A bug must not stop intake for ever; it is logged with its traceback
                    # and the next scan tries again (the state database is unchanged by a
                    # failed step).
                    self.shared.errors.set("intake", f"intake: {describe(exc)}")
                    failed = True
                    logger.exception("intake step failed")
                self._beat(None)
                if failed:
                    stop.wait(self.poll_interval)
                elif not more:
                    self.watcher.wait(self.poll_interval)  # woken by inotify events or stop
        finally:
            self.watcher.close()

    def _step_once(self) -> bool:
        """One scan of both folders and the quiet timer; True when more files are ready."""
        self._beat("walking the watch folder")
        # at most a batch per scan: a steady stream, however many files wait
        for f in self.watcher.scan(time.monotonic()):
            if self.shared.stop.is_set():
                break
            self.handle_file(f)
        self._beat("reading received files")
        more = self.intake_received() or self.watcher.more_ready
        self._beat("closing quiet studies")
        for uid in self.store.complete_quiet_studies(self.quiet_seconds, time.time()):
            logger.info("study %s complete", uid)
            self.shared.studies.put(uid)
        return more

    def intake_received(self) -> bool:
        """Handle a batch of received instances; True when more are ready."""
        if self.received is None:
            return False
        for f in self.received.scan(time.monotonic()):
            if self.shared.stop.is_set():
                break
            self.handle_file(f, self.received)
        return self.received.more_ready

    # -- one file ---------------------------------------------------------------------------

    def handle_file(
        self, f: ReadyFile, source: FolderWatcher | ReceivedFolder | None = None
    ) -> None:
        source = source or self.watcher
        name = self.naming.file_name(f.recorded)
        now = time.time()
        if f.refused is not None:  # a link, FIFO …: reported once, never opened
            self._reject(source, f, f.refused, now)
            return
        self._beat(f"reading {name}")
        try:
            record = read_header(f.relpath, root=f.root or source.root, seen=f)
        except Skipped as exc:
            logger.info("skipped %s: %s", name, exc.reason)
            self.store.record_file(f.recorded, f.size, f.mtime_ns, "skipped", exc.reason, now)
        except (FileChanged, FileGone, NotRegularFile):
            # Not the file the watcher saw (written, removed, or a link or FIFO swapped in since
            # it looked): it looks again, and what is there now is read or reported.
            logger.info("%s changed while it was read; will look at it again", name)
            return
        except FileUnreadable as exc:
            if not isinstance(source, FolderWatcher):
                self._reject(source, f, exc.reason, now)
                return
            attempts = source.retry_later(f, time.monotonic())
            if attempts == 1:  # once per file: the retries are counted in the status
                logger.warning(
                    "cannot read %s yet: %s; trying again with back-off (up to every %.0f s)",
                    name,
                    exc.reason,
                    source.retry_max,
                )
            return
        except InputRejected as exc:
            if not source.still_same(f):
                logger.info("%s changed while it was read; will read it again", name)
                return
            self._reject(source, f, exc.reason, now)
            return
        else:
            status = self.store.add_instance(f.recorded, f.size, f.mtime_ns, record, now)
            logger.info(
                "instance %s of study %s (%s, %s): %s",
                record.sop_instance_uid,
                record.study_instance_uid,
                record.modality,
                record.view,
                status,
            )
        source.mark_handled(f)

    def _reject(
        self, source: FolderWatcher | ReceivedFolder, f: ReadyFile, reason: str, now: float
    ) -> None:
        """Record ``f`` as rejected with its ``P/rejected`` message; not read again while it
        stays as it is."""
        logger.warning("rejected %s: %s", self.naming.file_name(f.recorded), reason)
        self.store.record_file(
            f.recorded,
            f.size,
            f.mtime_ns,
            "rejected",
            reason,
            now,
            message=self.naming.rejected(f.recorded, reason, None),
        )
        self.published()
        source.mark_handled(f)
