"""The PACS worker: the outbox's second destination (``pacs.enabled``).

It takes the rows of ``pacs_outbox`` whose next attempt has come, builds each result's SR
from the stored result and the headers of its study's scored instances (read again from the
watch or receive folder, pixels left out), and C-STOREs it. Success removes the row; any
failure keeps it with its reason and the next attempt after a back-off that doubles from
:data:`FIRST_RETRY_SECONDS` up to ``pacs.retry_max_seconds``. The row leaves only after the
PACS said success, and the SR's SOP Instance UID is derived from the result, so a crash
between the C-STORE and the row's removal sends the very same instance again, which the PACS
keeps once. MQTT delivery never waits for this worker, nor the reverse.

The rows go over one association while rows are waiting (:class:`~edge_agent.pacs.scu.Session`),
released once none has been due for :data:`LINGER_SECONDS`. A row whose C-STORE fails gets
that failure alone; when the association is lost with it, the next row opens a new one.
The thread runs :data:`NICE` steps below the rest of the agent: the SR is secondary, the
urgent MQTT message and the scoring that leads to it come first.
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
from ..dicom.instance_file import Rereading, read_again
from ..errors import InputRejected, describe
from ..pacs.scu import PacsError, Peer, Session
from ..pacs.sr import SRError, build_sr
from ..priority import lower_thread_priority
from ..results import StudyResult
from ..store import PacsRow, Store

logger = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 2.0
BATCH = 10
LINGER_SECONDS = 2.0
"""An association with nothing to send is released after this long."""
NICE = 10
"""Nice steps added to the PACS thread's value (Linux; relative, at most 19)."""

REREADING = Rereading(
    gone="a scored image is no longer in the watch folder",
    replaced="a scored image was replaced by another instance",
    unreadable="a scored image is no longer readable ({error})",
)
"""What a scored image read again for the SR can have become (``pacs_last_error``)."""


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
    ) -> None:
        self.store = store
        self.settings = settings
        self.peer = Peer.from_settings(settings)
        self.session = Session(self.peer)
        self.concepts = dict(concepts)
        self.agent = agent
        self.watch_dir = watch_dir
        self.stop = stop
        self._wake = threading.Event()
        self.last_error: str | None = None

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        lower_thread_priority(NICE, "PACS worker")
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
            if time.monotonic() - self.session.last_used >= LINGER_SECONDS:
                self.close()
            due = self.store.pacs_next_due()
            wait = 1.0 if due is None else min(1.0, max(0.05, due - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def close(self) -> None:
        """Release the association, if one is open."""
        self.session.close()

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
        try:
            sr = self.build(result, row.alert_id)
            self.session.store(sr)
        except (PacsError, SRError, InputRejected) as exc:
            reason = exc.reason if isinstance(exc, PacsError) else str(exc)
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
        self.store.pacs_stored(row.alert_id)
        self.last_error = None
        logger.info(
            "PACS: SR of result %s (%s, revision %d) stored at %s",
            row.alert_id,
            result.triage,
            result.revision,
            self.peer.where,
        )
        return True

    def build(self, result: StudyResult, alert_id: str) -> Dataset:
        """The SR of ``result``; anything that keeps it from being built is an SRError (the
        row is kept and retried, never lost to a header highdicom refuses)."""
        try:
            return build_sr(result, self.sources(result), concepts=self.concepts, agent=self.agent)
        except (SRError, InputRejected):
            raise
        except Exception as exc:
            logger.exception("PACS: the SR of result %s cannot be built", alert_id)
            raise SRError(f"SR not built: {describe(exc)}") from exc

    def sources(self, result: StudyResult) -> list[Dataset]:
        """Headers of the study's scored instances (the SR's evidence and patient/study)."""
        every = self.store.instances(result.study_instance_uid)
        # A not_scored result (pacs.levels may ask for them) has no scored image: its SR
        # refers to the instances that were received and not rejected.
        rows = [r for r in every if r.state == "scored"] or [
            r for r in every if r.state != "rejected"
        ]
        if not rows:
            raise SRError("no image of the study is recorded")
        return [
            read_again(self.watch_dir, r.path, r.sop_instance_uid, REREADING, pixels=False)
            for r in rows
        ]
