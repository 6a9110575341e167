"""The PACS worker: the outbox's second destination (``pacs.enabled``).

It takes the rows of ``pacs_outbox`` whose next attempt has come and hands each to the PACS
sender (:mod:`edge_agent.pacs.sender`, a child process), which builds the result's SR from
the stored result and the headers of its study's scored instances (read again from the
watch or receive folder, pixels left out) and C-STOREs it. Success removes the row; any
failure keeps it with its reason and the next attempt after a back-off that doubles from
:data:`FIRST_RETRY_SECONDS` up to ``pacs.retry_max_seconds``. The row leaves only after the
PACS said success, and the SR's SOP Instance UID is derived from the result, so a crash
between the C-STORE and the row's removal sends the very same instance again, which the PACS
keeps once. MQTT delivery never waits for this worker, nor the reverse.

The rows go over one association while rows are waiting, released once none has been sent
for :data:`LINGER_SECONDS`. A row whose C-STORE fails gets that failure alone; when the
association is lost with it, the next row opens a new one. The SR's work runs in the sender
process, niced, so that it neither takes the interpreter lock from the agent's threads nor
the cores from scoring: the SR is secondary, the urgent MQTT message comes first. This
thread only reads and writes the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from pydicom.dataset import Dataset

from ..bundle import Concept
from ..config import PacsSettings
from ..errors import describe
from ..pacs.scu import Peer
from ..pacs.sender import NICE, Job, Outcome, Sender, build, read_sources
from ..results import StudyResult
from ..store import PacsRow, Store

logger = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 2.0
BATCH = 10
LINGER_SECONDS = 2.0
"""An association with nothing to send is released after this long."""


def backoff(attempts: int, ceiling: float) -> float:
    """Seconds before attempt ``attempts + 1`` (``attempts`` failed so far, >= 1)."""
    return float(min(ceiling, FIRST_RETRY_SECONDS * 2 ** min(max(attempts - 1, 0), 20)))


class PacsWorker:
    name = "pacs"

    def __init__(
        self,
        store: Store,
        settings: PacsSettings,
        *,
        concepts: Mapping[str, Concept | None],
        agent: str,
        watch_dir: Path,
        stop: threading.Event,
        nice: int = NICE,
    ) -> None:
        self.store = store
        self.settings = settings
        self.peer = Peer.from_settings(settings)
        self.concepts = dict(concepts)
        self.agent = agent
        self.watch_dir = watch_dir
        self.stop = stop
        self.sender = Sender(
            settings, concepts=self.concepts, agent=agent, watch_dir=watch_dir, nice=nice
        )
        self._wake = threading.Event()
        self._last_sent: float | None = None
        self.last_error: str | None = None

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        try:
            self._loop()
        finally:
            self.close()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                busy = self.step(time.time())
            except Exception as exc:  # the store failed: try again in a while
                self.last_error = f"pacs worker: {describe(exc)}"
                logger.exception("PACS worker step failed")
                busy = False
            if busy:
                continue
            if self._last_sent is not None and time.monotonic() - self._last_sent >= LINGER_SECONDS:
                self._last_sent = None
                self.sender.release()
            due = self.store.pacs_next_due()
            wait = 1.0 if due is None else min(1.0, max(0.05, due - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def close(self) -> None:
        """Release the association and end the sender process."""
        self._last_sent = None
        self.sender.close()

    def step(self, now: float) -> bool:
        """Send the rows due at ``now``; True when there were any."""
        rows = self.store.pacs_due(now, BATCH)
        for row in rows:
            if self.stop.is_set():
                break
            self.send(row)
        return bool(rows)

    def send(self, row: PacsRow) -> bool:
        """One attempt for ``row``: True when the PACS stored its SR."""
        result = StudyResult.model_validate_json(row.payload)
        sources = self.source_files(result)
        if not sources:
            outcome = Outcome(False, "no image of the study is recorded")
        else:
            sent = self.sender.send(Job(row.alert_id, row.payload, sources), self.stop)
            if sent is None:  # stopping: the row is sent again at the next start
                logger.info("PACS: stopped while sending result %s", row.alert_id)
                return False
            outcome = sent
            self._last_sent = time.monotonic()
        if not outcome.stored:
            reason = outcome.reason or "not stored"
            delay = backoff(row.attempts + 1, self.settings.retry_max_seconds)
            self.store.pacs_failed(row.alert_id, reason, time.time() + delay)
            self.last_error = reason
            logger.warning(
                "PACS: result %s (%s) not stored, attempt %d: %s; next try in %.0f s",
                row.alert_id,
                result.triage,
                row.attempts + 1,
                reason,
                delay,
            )
            return False
        self.store.pacs_stored(row.alert_id, time.time())
        self.last_error = None
        logger.info(
            "PACS: SR of result %s (%s, revision %d) stored at %s",
            row.alert_id,
            result.triage,
            result.revision,
            self.peer.where,
        )
        return True

    def source_files(self, result: StudyResult) -> tuple[tuple[str, str], ...]:
        """Path and SOP Instance UID of the study's scored instances (the SR's evidence
        and patient/study); empty when none is recorded."""
        every = self.store.instances(result.study_instance_uid)
        # A not_scored result (pacs.levels may ask for them) has no scored image: its SR
        # refers to the instances that were received and not rejected.
        rows = [r for r in every if r.state == "scored"] or [
            r for r in every if r.state != "rejected"
        ]
        return tuple((r.path, r.sop_instance_uid) for r in rows)

    def sources(self, result: StudyResult) -> list[Dataset]:
        """The headers the sender reads for ``result``, read here (for the tests)."""
        return read_sources(self.watch_dir, self.source_files(result))

    def build(self, result: StudyResult) -> Dataset:
        """The SR the sender builds for ``result``, built here (for the tests)."""
        return build(result, self.sources(result), self.concepts, self.agent)
