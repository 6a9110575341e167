"""The composition root: builds the road and owns its threads.

    watch folder ─▶ intake thread ─▶ store (instances, studies) ─▶ quiet timer
        ─▶ scoring thread (imaging, runner, triage) ─▶ store (result + outbox)
        ─▶ publisher (paho) ─▶ broker ─▶ PUBACK ─▶ outbox row deleted
    urgent result ─▶ store (narrative job) ─▶ narrative thread (MedGemma, paused while a
        study is scored) ─▶ store (next revision + outbox) ─▶ publisher

Each arrow that crosses a thread goes through the SQLite store, so a crash at any point
resumes where it stopped: complete studies are scored again, unacknowledged messages are
published again with the same content.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .bundle import Bundle
from .config import Settings
from .errors import ConfigError, EdgeTriageError, InputRejected, describe
from .health import HealthMonitor
from .identifiers import FILE_ID_KEY, file_id, topic, uid_problem, valid_uid
from .intake.header import Skipped, read_header
from .intake.instance_file import FileChanged, FileGone, FileUnreadable, NotRegularFile
from .intake.scp import ReceivedFolder, StorageSCP, published_path
from .intake.watcher import FolderWatcher, ReadyFile
from .logs import fields
from .mqtt import Ack, Publisher
from .narrative import NarrativeWorker
from .notify import Notifier

# bundle_path and demo_bundle_path stay importable from here (demo, tests, benchmarks).
from .preflight import bundle_path as bundle_path
from .preflight import demo_bundle_path as demo_bundle_path
from .preflight import preflight
from .profiles import Profile
from .results import RejectedFile, StudyResult
from .runners import Runner, open_runner
from .runners.onnxruntime import available_providers
from .scoring import Scorer
from .store import AckOutcome, Message, NarrativeJob, StudyRow, open_state
from .waiting import RETRY_MAX_SECONDS, ScoringWaits, retry_delay

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0
SCP_STOP_SECONDS = 3.0  # part of STOP_GRACE_SECONDS: stores being written may finish


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


@dataclass
class Components:
    """What the preflight resolved (:func:`prepare`); ``edge-agent check`` runs the same
    checks and reports the same things."""

    settings: Settings
    profile: Profile
    profile_reason: str
    bundle: Bundle
    narrative: bool = False  # the narrative worker runs (edge_agent.preflight.narrative_plan)
    narrative_budget: float = 0.0


def prepare(settings: Settings) -> Components:
    """Run the preflight checks ``run`` runs (:data:`edge_agent.preflight.CHECKS`); raises
    the first failure (ConfigError: exit 2, ResourceMissing: exit 3)."""
    found = preflight(settings)
    assert found.profile is not None and found.bundle is not None
    return Components(
        settings,
        found.profile,
        found.profile_reason,
        found.bundle,
        narrative=found.narrative,
        narrative_budget=found.narrative_budget,
    )


class Agent:
    """The daemon. ``run()`` blocks until ``stop()`` (or a signal handler calling it)."""

    def __init__(self, settings: Settings, components: Components | None = None) -> None:
        self.settings = settings
        self.components = components or prepare(settings)
        self.bundle = self.components.bundle
        self.profile = self.components.profile
        self.store, aside = open_state(
            settings.state_dir / "state.sqlite3",
            outbox_max_messages=settings.mqtt.outbox_max_messages,
        )
        self._file_id_key = self.store.secret(FILE_ID_KEY)
        self.runner: Runner = open_runner(
            self.bundle, self.profile, cache_dir=settings.state_dir / "engine-cache"
        )
        self._stop = threading.Event()
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._queued_lock = threading.Lock()
        self.waits = ScoringWaits(settings.state_dir)
        self._prepared: dict[str, _Prepared] = {}  # the scoring thread's only
        self.scorer = Scorer(
            self.bundle,
            self.runner,
            settings.watch_dir,
            batch_size=self.profile.runtime.batch_size,
            publish_accession=settings.phi.publish_accession_number,
            should_stop=self._stop.is_set,
            selection=settings.selection,
        )
        self.watcher = FolderWatcher(
            settings.watch_dir,
            stable_seconds=settings.intake.file_stable_seconds,
            ignore_suffixes=settings.intake.ignore_suffixes,
            handled=self.store.file_signatures(),
            watch_mode=settings.intake.watch_mode,
            poll_interval=settings.intake.poll_interval_seconds,
            rescan_seconds=settings.intake.rescan_seconds,
            retry_max=settings.intake.retry_max_seconds,
            shown=self._file_name,
        )
        # The intake's heartbeat: what it is doing and since when (monotonic), None while it
        # waits for files. A step that takes longer than intake.stall_seconds (a read from a
        # hung network mount) makes the agent NOT HEALTHY (:meth:`intake_stall`).
        self._intake_step: tuple[str, float] | None = None
        # scp.enabled: the DICOM Storage SCP writes what modalities push into a folder of its
        # own, the intake's second root (edge_agent/intake/scp.py).
        self.receiver: StorageSCP | None = None
        self.received: ReceivedFolder | None = None
        if settings.scp.enabled:
            folder = settings.scp.receive_folder(settings.state_dir)
            self.received = ReceivedFolder(folder, handled=self.store.file_signatures())
            self.receiver = StorageSCP(settings.scp, folder, on_stored=self._on_received)
        self.publisher = Publisher(
            settings, self.store, status=self.status_fields, on_ack=self._on_ack
        )
        self._scoring_idle = threading.Event()
        self._scoring_idle.set()
        self.narrator = self._narrative_worker()
        self.notifier = Notifier()
        # The box's temperatures, clocks, memory and free space, read by the "health" thread;
        # below the state disk's floor the intake waits (health.intake_paused).
        self.health = HealthMonitor(
            self.profile.health,
            settings.state_dir,
            settings.watch_dir,
            notify=lambda paused: self.notifier.status(paused or self._summary),
        )
        self._summary = "starting"
        self._metrics: Any = None
        self.last_error: str | None = (
            None if aside is None else f"state database was damaged: set aside as {aside.name}"
        )
        self._healthy = True
        self._unhealthy_reason = ""
        self._stored_mqtt_error: str | None = None
        self._threads: list[threading.Thread] = []
        self.started = threading.Event()

    def _narrative_worker(self) -> NarrativeWorker | None:
        """The draft-narrative thread, when the preflight decided it runs (config, else the
        profile, enables it and the bundle has a report section)."""
        if not self.components.narrative:
            return None
        budget = self.components.narrative_budget
        cfg = self.profile.narrative
        available = set(available_providers())
        providers: list[str] = [p for p in cfg.providers if p in available] or [
            "CPUExecutionProvider"
        ]
        return NarrativeWorker(
            self.store,
            self.bundle,
            watch_dir=self.settings.watch_dir,
            providers=providers,
            threads=cfg.intra_op_threads,
            max_new_tokens=cfg.max_new_tokens,
            nice=cfg.nice,
            budget_seconds=budget,
            scoring_idle=self._scoring_idle,
            stop=self._stop,
            topic=lambda uid: self._topic("study", uid),
            published=self.publisher.wake,
        )

    # -- status -----------------------------------------------------------------------------

    def status_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = dict(self.store.counters())
        fields.update(self.publisher.counters())
        fields.update(
            model=self.bundle.manifest.model.name,
            model_version=self.bundle.manifest.model.version,
            demo=self.bundle.manifest.model.demo,
            provider=self.runner.provider,
            profile=self.profile.name,
            agent_version=__version__,
            last_error=self.last_error,
            mqtt_last_error=self.publisher.last_error,
            **self.waits.status_fields(),
            read_retries=self.watcher.retrying,
        )
        if self.narrator is not None:
            fields["narrative_last_error"] = self.narrator.last_error or self.narrator.load_error
        fields["health"] = self.health.fields()  # the health thread's last reading
        return fields

    def _on_ack(self, ack: Ack) -> AckOutcome:
        """A dashboard's ack (paho's network thread), checked by the publisher: recorded in
        the store; the publisher logs and counts the outcome."""
        return self.store.acknowledge(ack.study_instance_uid, ack.alert_id, ack.by, ack.at)

    def _renotify(self) -> None:
        """Queue the unacknowledged urgent results that are due again (mqtt.renotify_*)."""
        every = self.settings.mqtt.renotify_seconds
        if every > 0 and self.store.enqueue_renotifications(
            time.time(), every, self.settings.mqtt.renotify_limit
        ):
            self.publisher.wake()

    def _problems(self) -> list[str]:
        """Why the agent is not healthy (empty: healthy): a thread that died, or delivery
        that is stuck although the broker is there."""
        dead = [t.name for t in self._threads if not t.is_alive()]
        if not self.publisher.healthy():
            dead.append("MQTT publisher")
        if self.receiver is not None and not self.receiver.healthy():
            dead.append("C-STORE receiver")
        problems = [f"{', '.join(dead)} stopped"] if dead else []
        stall = self.intake_stall()
        if stall is not None:
            problems.append(stall)
        stalled = self.publisher.stalled()
        if stalled is not None:
            problems.append(stalled)
        return problems

    def _watch_health(self) -> None:
        """Log (once per change) when the agent becomes unhealthy, why, and when it is
        healthy again. Also stores the publisher's latest problem and ack counts for
        ``edge-agent status`` (it cannot reach the broker's status message)."""
        error, counts = self.publisher.last_error, self.publisher.acks.take()
        if error != self._stored_mqtt_error or any(counts.values()):
            try:
                self.store.note_delivery(error, counts)
                self._stored_mqtt_error = error
            except Exception:  # the store failed; the next second tries again
                self.publisher.acks.untake(counts)
                logger.exception("could not store the delivery figures")
        problems = self._problems()
        healthy = not problems
        reason = "; ".join(problems)
        if healthy == self._healthy and (healthy or reason == self._unhealthy_reason):
            return
        self._healthy = healthy
        self._unhealthy_reason = reason
        if healthy:
            logger.info("healthy again")
            self.notifier.status(self._summary)
            return
        self.last_error = f"not healthy: {reason}"
        self.notifier.status(f"NOT HEALTHY: {reason}; watchdog pings stopped")
        logger.error(
            "%s; watchdog pings stop (systemd restarts the agent where WatchdogSec is set)",
            self.last_error,
        )

    # -- intake -----------------------------------------------------------------------------

    def _topic(self, *levels: str) -> str:
        """``P/level/…``: every level checked (a topic segment, or a UID for study topics),
        so that no control character or wildcard from a file ever reaches the broker."""
        return topic(self.settings.topic_base, *levels)

    def _reject_message(self, relpath: str, reason: str, sop_uid: str | None) -> Message:
        """``P/rejected``: the file by its id; by its path too when phi.publish_paths."""
        payload = RejectedFile(
            path=published_path(relpath) if self.settings.phi.publish_paths else None,
            file_id=file_id(self._file_id_key, relpath),
            sop_instance_uid=sop_uid,
            reason=reason,
        )
        return Message("rejected", self._topic("rejected"), payload.to_json_bytes())

    def _file_name(self, relpath: str) -> str:
        """How a log line names a file: by its id (``edge-agent status --file``), and by
        its path only when phi.publish_paths (folders are often named after the patient)."""
        name = f"file {file_id(self._file_id_key, relpath)}"
        return f"{name} ({relpath})" if self.settings.phi.publish_paths else name

    def _on_received(self, path: Path) -> None:
        """The SCP stored an instance (an association thread): wake the intake."""
        assert self.received is not None
        self.received.stored(path)
        self.watcher.wake()

    def _intake_received(self) -> bool:
        """Handle a batch of received instances; True when more are ready."""
        if self.received is None:
            return False
        for f in self.received.scan(time.monotonic()):
            if self._stop.is_set():
                break
            self._handle_file(f, self.received)
        return self.received.more_ready

    def _handle_file(
        self, f: ReadyFile, source: FolderWatcher | ReceivedFolder | None = None
    ) -> None:
        source = source or self.watcher
        now = time.time()
        if f.refused is not None:  # a link, FIFO …: reported once, never opened
            self._reject(source, f, f.refused, now)
            return
        self._intake_beat(f"reading {self._file_name(f.recorded)}")
        try:
            record = read_header(f.relpath, root=f.root or source.root, seen=f)
        except Skipped as exc:
            logger.info("skipped %s: %s", self._file_name(f.recorded), exc.reason)
            self.store.record_file(f.recorded, f.size, f.mtime_ns, "skipped", exc.reason, now)
        except (FileChanged, FileGone, NotRegularFile):
            # Not the file the watcher saw (written, removed, or a link or FIFO swapped in since
            # it looked): it looks again, and what is there now is read or reported.
            logger.info(
                "%s changed while it was read; will look at it again", self._file_name(f.recorded)
            )
            return
        except FileUnreadable as exc:
            if not isinstance(source, FolderWatcher):
                self._reject(source, f, exc.reason, now)
                return
            attempts = source.retry_later(f, time.monotonic())
            if attempts == 1:  # once per file: the retries are counted in the status
                logger.warning(
                    "cannot read %s yet: %s; trying again with back-off (up to every %.0f s)",
                    self._file_name(f.recorded),
                    exc.reason,
                    source.retry_max,
                )
            return
        except InputRejected as exc:
            if not source.still_same(f):
                logger.info(
                    "%s changed while it was read; will read it again", self._file_name(f.recorded)
                )
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
        logger.warning("rejected %s: %s", self._file_name(f.recorded), reason)
        self.store.record_file(
            f.recorded,
            f.size,
            f.mtime_ns,
            "rejected",
            reason,
            now,
            message=self._reject_message(f.recorded, reason, None),
        )
        self.publisher.wake()
        source.mark_handled(f)

    def _intake_beat(self, doing: str | None) -> None:
        """The intake starts ``doing`` (None: it waits for files)."""
        self._intake_step = None if doing is None else (doing, time.monotonic())

    def intake_stall(self) -> str | None:
        """Why the intake is stuck (one step over ``intake.stall_seconds``), or None."""
        step = self._intake_step
        if step is None:
            return None
        doing, since = step
        took = time.monotonic() - since
        if took <= self.settings.intake.stall_seconds:
            return None
        return f"intake stuck for {took:.0f} s {doing}"

    def _enqueue(self, uid: str) -> None:
        with self._queued_lock:
            if uid in self._queued:
                return
            self._queued.add(uid)
        self._queue.put(uid)

    def _intake_loop(self) -> None:
        interval = self.settings.intake.poll_interval_seconds
        self.watcher.start()  # inotify or polling; logs which and why
        try:
            while not self._stop.is_set():
                if self.health.intake_paused:  # state disk below its floor; logged by health
                    self._stop.wait(interval)
                    continue
                more = failed = False
                try:
                    self._intake_beat("walking the watch folder")
                    # at most a batch per scan: a steady stream, however many files wait
                    for f in self.watcher.scan(time.monotonic()):
                        if self._stop.is_set():
                            break
                        self._handle_file(f)
                    self._intake_beat("reading received files")
                    more = self._intake_received() or self.watcher.more_ready
                    self._intake_beat("closing quiet studies")
                    for uid in self.store.complete_quiet_studies(
                        self.settings.study_quiet_seconds, time.time()
                    ):
                        logger.info("study %s complete", uid)
                        self._enqueue(uid)
                except EdgeTriageError as exc:
                    self.last_error, failed = str(exc), True
                    logger.error("intake: %s", exc)
                except Exception as exc:
                    # A bug must not stop intake for ever; it is logged with its traceback
                    # and the next scan tries again (the state database is unchanged by a
                    # failed step).
                    self.last_error, failed = f"intake: {describe(exc)}", True
                    logger.exception("intake step failed")
                self._intake_beat(None)
                if failed:
                    self._stop.wait(interval)
                elif not more:
                    self.watcher.wait(interval)  # woken early by inotify events or stop()
        finally:
            self.watcher.close()

    # -- scoring ----------------------------------------------------------------------------

    def _score_one(self, uid: str) -> bool:
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
            return self._score_one(uid)
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
        self._scoring_idle.clear()  # the narrative thread waits: flags first
        try:
            scored = self.scorer.score(study, instances, self.store.rejected_count(uid))
        finally:
            self._scoring_idle.set()
        if scored is None:
            logger.info("stopping: study %s left complete, scored at next start", uid)
            return None
        result = scored.result
        narrative = self.narrator is not None and scored.narrative_source is not None
        if narrative:
            result = result.model_copy(update={"narrative_status": "pending"})
        rejects = [
            self._reject_message(inst.path, reason, inst.sop_instance_uid)
            for inst, reason in scored.rejected
        ]
        message = Message(
            "result", self._topic("study", uid), result.to_json_bytes(), result.alert_id
        )
        source = (
            scored.narrative_source.to_json() if narrative and scored.narrative_source else None
        )
        return _Prepared(study, result, message, scored.instance_states, rejects, source)

    def _commit(self, p: _Prepared) -> bool:
        """Commit a scored result; False when the study changed meanwhile (nothing stored)."""
        uid, result = p.study.study_instance_uid, p.result
        now = time.time()
        job = None
        if p.narrative_source is not None and self.narrator is not None:
            # The budget runs from the commit: a result that waited is not born late.
            job = NarrativeJob(
                result.alert_id,
                uid,
                result.revision,
                p.narrative_source,
                now + self.narrator.budget_seconds,
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
        self.publisher.wake()
        if job is not None and self.narrator is not None:
            self.narrator.wake()
        return True

    def _next_study(self) -> str | None:
        """The next study to try: a waiting one whose retry is due, else one from the queue
        (waiting at most until the next retry is due)."""
        now = time.monotonic()
        uid = self.waits.due(now)
        if uid is not None:
            return uid
        wait = self.waits.seconds_to_next(now)
        try:
            uid = self._queue.get(timeout=0.5 if wait is None else min(0.5, max(wait, 0.01)))
        except queue.Empty:
            return None
        with self._queued_lock:
            self._queued.discard(uid)
        return uid

    def _scoring_loop(self) -> None:
        while not self._stop.is_set():
            uid = self._next_study()
            if uid is None:
                continue
            prepared = self._prepared.get(uid)
            if prepared is not None:
                prepared.retried = True
            try:
                stored = self._score_one(uid)
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

    def _wait_and_retry(self, uid: str, exc: Exception) -> None:
        """Keep ``uid`` queued, to be tried again with back-off; log the first failure."""
        reason = describe(exc)  # "database is locked", "database or disk is full", …
        self.last_error = f"scoring study {uid}: {reason}"
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

    # -- lifecycle --------------------------------------------------------------------------

    def healthy(self) -> bool:
        return not self._problems()

    def run(self) -> None:
        for uid in self.store.studies_in_state("complete"):
            self._enqueue(uid)  # complete before a restart, not yet scored
        if self.receiver is not None:
            self.receiver.start()  # binds first: a busy port stops the start with its key
        self.health.update()  # the first reading before intake starts (a full disk waits)
        self.publisher.start()
        if self.settings.metrics.port:
            self._start_metrics()
        self._threads = [
            threading.Thread(target=self._intake_loop, name="intake", daemon=True),
            threading.Thread(target=self._scoring_loop, name="scoring", daemon=True),
            threading.Thread(
                target=self.health.run, args=(self._stop,), name="health", daemon=True
            ),
        ]
        if self.narrator is not None:
            self._threads.append(
                threading.Thread(target=self.narrator.run, name="narrative", daemon=True)
            )
        for t in self._threads:
            t.start()
        model = self.bundle.manifest.model
        summary = (
            f"watching {self.settings.watch_dir}; model {model.name} {model.version}"
            f"{' (DEMO)' if model.demo else ''} on {self.runner.provider}"
        )
        if self.receiver is not None:
            host, port = self.receiver.address
            summary += f"; C-STORE SCP {self.settings.scp.ae_title} on {host}:{port}"
        logger.info("edge-agent %s running: %s", __version__, summary)
        if model.demo:
            logger.warning(
                "DEMO MODEL in use (%s): results are marked demo and are not for clinical use; "
                "set 'bundle' to a real engine bundle",
                model.name,
            )
        self._summary = summary
        self.notifier.ready(summary)
        self.started.set()
        ping = self.notifier.watchdog_interval()
        next_ping = 0.0
        while not self._stop.wait(min(ping or 1.0, 1.0)):
            try:
                self._renotify()
            except Exception as exc:  # the store failed; next second tries again
                self.last_error = f"renotify: {describe(exc)}"
                logger.exception("queueing re-notifications failed")
            self._watch_health()
            if ping and time.monotonic() >= next_ping and self._healthy:
                self.notifier.watchdog()
                next_ping = time.monotonic() + ping
        self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        self.watcher.wake()

    def _start_metrics(self) -> None:
        from .metrics import start_metrics_server

        cfg = self.settings.metrics
        model = self.bundle.manifest.model
        info = {
            "model": model.name,
            "version": model.version,
            "precision": self.bundle.manifest.precision,
            "provider": str(self.runner.provider),
            "demo": str(model.demo).lower(),
        }
        try:
            self._metrics = start_metrics_server(
                self.settings.state_dir / "state.sqlite3", cfg.port, cfg.bind_address, info
            )
        except OSError as exc:
            raise ConfigError(
                "metrics.port", f"cannot serve metrics on {cfg.bind_address}:{cfg.port}: {exc}"
            ) from exc
        logger.info("Prometheus metrics on http://%s:%d/metrics", cfg.bind_address, cfg.port)

    def _shutdown(self) -> None:
        self.notifier.stopping()
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        if self.receiver is not None:  # first: no instance is taken that is not on disk
            self.receiver.stop(timeout=SCP_STOP_SECONDS)
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                logger.warning(
                    "thread %s still busy at shutdown; its work resumes at next start", t.name
                )
        self.publisher.stop("stopped", timeout=max(1.0, deadline - time.monotonic()))
        self.waits.close()
        self.store.close()
        self.notifier.close()
        logger.info("edge-agent stopped")
