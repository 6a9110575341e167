"""The scoring worker: complete studies from the queue through the scorer into the store
(result, outbox row and, for an urgent study, its narrative job, in one transaction)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..dicom.uid import uid_problem, valid_uid
from ..errors import EdgeTriageError, describe
from ..logs import fields
from ..results import StudyResult
from ..scoring import Scorer
from ..store import Message, NarrativeJob, Store, StudyRow
from ..waiting import RETRY_MAX_SECONDS, ScoringWaits, retry_delay
from .naming import Naming
from .shared import Shared

logger = logging.getLogger(__name__)


class Narratives(Protocol):
    """What scoring needs of the narrative worker: the budget of a job, and a wake-up."""

    budget_seconds: float

    def wake(self) -> None: ...


@dataclass
class _Prepared:
    """A scored result, ready to commit (kept while its commit is tried again)."""

    study: StudyRow
    result: StudyResult
    message: Message
    instance_states: dict[str, tuple[str, str | None]]
    rejects: list[Message]
    narrative_source: str | None
    retried: bool = False


class ScoringWorker:
    """The ``scoring`` thread (:meth:`run`).

    Reads: ``shared.studies``, the store (studies, instances), the instance files (through
    ``scorer``), ``shared.stop``. Writes: the store (results, outbox rows, narrative jobs),
    ``waits`` (studies tried again with back-off), ``shared.scoring_idle`` (clear while a
    study is scored) and its slot ``scoring`` of ``shared.errors``; wakes the publisher
    (``published``) and the narrative worker after a commit.
    """

    name = "scoring"

    def __init__(
        self,
        store: Store,
        scorer: Scorer,
        waits: ScoringWaits,
        naming: Naming,
        shared: Shared,
        *,
        narratives: Narratives | None,
        published: Callable[[], None],
    ) -> None:
        self.store = store
        self.scorer = scorer
        self.waits = waits
        self.naming = naming
        self.shared = shared
        self.narratives = narratives
        self.published = published
        self._prepared: dict[str, _Prepared] = {}  # this thread's only

    # -- the thread -------------------------------------------------------------------------

    def run(self) -> None:
        while not self.shared.stop.is_set():
            uid = self._next_study()
            if uid is None:
                continue
            prepared = self._prepared.get(uid)
            if prepared is not None:
                prepared.retried = True
            try:
                stored = self.score_one(uid)
            except Exception as exc:
                self._wait_and_retry(uid, exc)
                continue
            entry = self.waits.done(uid)
            if entry is not None:
                logger.info(
                    "study %s: %s after %d failed attempt(s), %.0f s after the first (%s)",
                    uid,
                    "stored" if stored else "no longer waiting (not complete any more)",
                    entry.attempts,
                    time.time() - entry.since,
                    entry.reason,
                )

    def _next_study(self) -> str | None:
        """The next study to try: a waiting one whose retry is due, else one from the queue
        (waiting at most until the next retry is due)."""
        now = time.monotonic()
        uid = self.waits.due(now)
        if uid is not None:
            return uid
        wait = self.waits.seconds_to_next(now)
        return self.shared.studies.get(0.5 if wait is None else min(0.5, max(wait, 0.01)))

    def _wait_and_retry(self, uid: str, exc: Exception) -> None:
        """Keep ``uid`` queued, to be tried again with back-off; log the first failure."""
        reason = describe(exc)  # "database is locked", "database or disk is full", …
        self.shared.errors.set("scoring", f"scoring study {uid}: {reason}")
        entry, first = self.waits.failed(uid, reason)
        step = "storing its result" if uid in self._prepared else "scoring"
        if first:
            # Once per study (every later attempt is in the status); a bug's traceback once.
            logger.error(
                "study %s: %s failed (%s); it stays queued and is tried again in %.0f s, "
                "then at most every %.0f s, until it is stored",
                uid,
                step,
                reason,
                retry_delay(entry.attempts),
                RETRY_MAX_SECONDS,
                exc_info=not isinstance(exc, (EdgeTriageError, sqlite3.Error, OSError)),
            )

    # -- one study --------------------------------------------------------------------------

    def score_one(self, uid: str) -> bool:
        """Score ``uid`` and commit its result; True once stored. Raises when either step
        fails.

        A result scored before a failed commit is kept (``self._prepared``) and only its
        commit is tried again: a full disk does not make the encoder run once a minute.
        """
        prepared = self._prepared.get(uid)
        if prepared is None:
            prepared = self._score(uid)
            if prepared is None:
                return False
            self._prepared[uid] = prepared
        committed = self._commit(prepared)  # when it raises, the result stays prepared
        del self._prepared[uid]
        if not committed and prepared.retried:
            # Re-opened (and maybe complete again) while it waited: score what is there now.
            return self.score_one(uid)
        if not committed:
            logger.info("study %s changed while it was scored; it will be scored again", uid)
        return committed

    def _score(self, uid: str) -> _Prepared | None:
        study = self.store.study(uid)
        if study is None or study.state != "complete":
            return None
        problem = uid_problem(uid)
        if problem is not None or valid_uid(uid) != uid:
            # Recorded by an earlier version, whose check let a trailing newline through: its
            # result could only go out on a topic the broker refuses. Said once per start.
            logger.error(
                "a study recorded by an earlier version has a malformed StudyInstanceUID "
                "(%s): not scored",
                problem or "padding",
            )
            return None
        instances = self.store.instances(uid)
        idle = self.shared.scoring_idle
        idle.clear()  # the narrative thread waits: flags first
        try:
            scored = self.scorer.score(study, instances, self.store.rejected_count(uid))
        finally:
            idle.set()
        if scored is None:
            logger.info("stopping: study %s left complete, scored at next start", uid)
            return None
        result = scored.result
        source = scored.narrative_source if self.narratives is not None else None
        if source is not None:
            result = result.model_copy(update={"narrative_status": "pending"})
        rejects = [
            self.naming.rejected(inst.path, reason, inst.sop_instance_uid)
            for inst, reason in scored.rejected
        ]
        message = Message(
            "result", self.naming.topic("study", uid), result.to_json_bytes(), result.alert_id
        )
        return _Prepared(
            study,
            result,
            message,
            scored.instance_states,
            rejects,
            None if source is None else source.to_json(),
        )

    def _commit(self, p: _Prepared) -> bool:
        """Commit a scored result; False when the study changed meanwhile (nothing stored)."""
        uid, result = p.study.study_instance_uid, p.result
        now = time.time()
        job = None
        if p.narrative_source is not None and self.narratives is not None:
            # The budget runs from the commit: a result that waited is not born late.
            job = NarrativeJob(
                result.alert_id,
                uid,
                result.revision,
                p.narrative_source,
                now + self.narratives.budget_seconds,
            )
        if not self.store.commit_result(
            p.study, result.triage, p.message, p.instance_states, p.rejects, now, job
        ):
            return False
        top = max(result.findings, key=lambda f: f.score, default=None)
        logger.info(
            "study %s revision %d: %s%s (alert %s, %.0f ms)",
            uid,
            result.revision,
            result.triage,
            f", top {top.code} {top.score:.3f}" if top else f", {result.reason}",
            result.alert_id,
            result.timing.inference_ms,
            extra=fields(
                study_uid=uid,
                alert_id=result.alert_id,
                revision=result.revision,
                triage=result.triage,
                stage="score",
                duration_ms=round(result.timing.inference_ms or 0.0, 1),
            ),
        )
        self.published()
        if job is not None and self.narratives is not None:
            self.narratives.wake()
        return True
