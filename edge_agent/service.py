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
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .bundle import Bundle, load_bundle
from .config import Settings
from .errors import ConfigError, EdgeTriageError, InputRejected
from .health import HealthMonitor
from .intake.header import Skipped, read_header
from .intake.scp import ReceivedFolder, StorageSCP, published_path
from .intake.watcher import FolderWatcher, ReadyFile
from .logs import fields
from .mqtt import Publisher
from .narrative import NarrativeWorker
from .notify import Notifier
from .profiles import Profile, narrative_wanted, resolve_profile
from .results import RejectedFile
from .runners import Runner, open_runner
from .runners.onnxruntime import available_providers
from .scoring import Scorer
from .store import Message, NarrativeJob, Store

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0
SCP_STOP_SECONDS = 3.0  # part of STOP_GRACE_SECONDS: stores being written may finish


def demo_bundle_path() -> Path:
    return Path(str(resources.files("edge_agent") / "data" / "demo-bundle"))


def bundle_path(settings: Settings) -> Path:
    return settings.bundle if settings.bundle is not None else demo_bundle_path()


@dataclass
class Components:
    """What :func:`prepare` resolved; ``edge-agent check`` reports the same things."""

    settings: Settings
    profile: Profile
    profile_reason: str
    bundle: Bundle


def prepare(settings: Settings) -> Components:
    profile, why = resolve_profile(settings.profile)
    if not settings.watch_dir.is_dir():
        raise ConfigError("watch_dir", f"{settings.watch_dir} is not a folder")
    if settings.scp.enabled:
        received = settings.scp.receive_folder(settings.state_dir)
        if received.is_relative_to(settings.watch_dir.absolute()):
            raise ConfigError("scp.receive_dir", f"{received} must not be inside watch_dir")
    bundle = load_bundle(bundle_path(settings))
    return Components(settings, profile, why, bundle)


class Agent:
    """The daemon. ``run()`` blocks until ``stop()`` (or a signal handler calling it)."""

    def __init__(self, settings: Settings, components: Components | None = None) -> None:
        self.settings = settings
        self.components = components or prepare(settings)
        self.bundle = self.components.bundle
        self.profile = self.components.profile
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(
            settings.state_dir / "state.sqlite3",
            outbox_max_messages=settings.mqtt.outbox_max_messages,
        )
        self.runner: Runner = open_runner(
            self.bundle, self.profile, cache_dir=settings.state_dir / "engine-cache"
        )
        self._stop = threading.Event()
        self._queue: queue.Queue[str] = queue.Queue()
        self._queued: set[str] = set()
        self._queued_lock = threading.Lock()
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
        )
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
        self.last_error: str | None = None
        self._healthy = True
        self._threads: list[threading.Thread] = []
        self.started = threading.Event()

    def _narrative_worker(self) -> NarrativeWorker | None:
        """The draft-narrative thread, when config (or else the profile) enables it and the
        bundle has a report section."""
        wanted, budget = narrative_wanted(self.settings.narrative, self.profile)
        if not wanted:
            return None
        if self.bundle.manifest.report is None:
            logger.warning(
                "narratives enabled, but bundle %s has no report section (edge-export "
                "add-report): no narratives",
                self.bundle.root,
            )
            return None
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
            topic=lambda uid: self._topic(f"study/{uid}"),
            published=self.publisher.wake,
        )

    # -- status -----------------------------------------------------------------------------

    def status_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = dict(self.store.counters())
        fields.update(
            model=self.bundle.manifest.model.name,
            model_version=self.bundle.manifest.model.version,
            demo=self.bundle.manifest.model.demo,
            provider=self.runner.provider,
            profile=self.profile.name,
            agent_version=__version__,
            last_error=self.last_error,
            mqtt_last_error=self.publisher.last_error,
        )
        if self.narrator is not None:
            fields["narrative_last_error"] = self.narrator.last_error or self.narrator.load_error
        fields["health"] = self.health.fields()  # the health thread's last reading
        return fields

    def _on_ack(self, study_instance_uid: str, ack: dict[str, Any]) -> None:
        """A dashboard's ack (paho's network thread): recorded in the store."""
        by, at = ack.get("by"), ack.get("at")
        outcome = self.store.acknowledge(
            study_instance_uid,
            ack["alert_id"],
            by if isinstance(by, str) else None,
            at if isinstance(at, str) else None,
        )
        logger.info("ack for study %s alert %s: %s", study_instance_uid, ack["alert_id"], outcome)

    def _renotify(self) -> None:
        """Queue the unacknowledged urgent results that are due again (mqtt.renotify_*)."""
        every = self.settings.mqtt.renotify_seconds
        if every > 0 and self.store.enqueue_renotifications(
            time.time(), every, self.settings.mqtt.renotify_limit
        ):
            self.publisher.wake()

    def _watch_health(self) -> None:
        """Log (once per change) when a thread of the daemon has died or came back."""
        healthy = self.healthy()
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            logger.info("all threads healthy again")
            self.notifier.status(self._summary)
            return
        dead = [t.name for t in self._threads if not t.is_alive()]
        if not self.publisher.healthy():
            dead.append("MQTT publisher")
        if self.receiver is not None and not self.receiver.healthy():
            dead.append("C-STORE receiver")
        self.last_error = f"not healthy: {', '.join(dead)} stopped"
        self.notifier.status(f"NOT HEALTHY: {', '.join(dead)} stopped; watchdog pings stopped")
        logger.error(
            "%s; watchdog pings stop (systemd restarts the agent where WatchdogSec is set)",
            self.last_error,
        )

    # -- intake -----------------------------------------------------------------------------

    def _topic(self, leaf: str) -> str:
        return f"{self.settings.topic_base}/{leaf}"

    def _reject_message(self, relpath: str, reason: str, sop_uid: str | None) -> Message:
        payload = RejectedFile(
            path=published_path(relpath), sop_instance_uid=sop_uid, reason=reason
        )
        return Message("rejected", self._topic("rejected"), payload.to_json_bytes())

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
        try:
            record = read_header(f.path)
        except Skipped as exc:
            logger.info("skipped %s: %s", f.relpath, exc.reason)
            self.store.record_file(f.relpath, f.size, f.mtime_ns, "skipped", exc.reason, now)
        except InputRejected as exc:
            if not source.still_same(f):
                logger.info("%s changed while it was read; will read it again", f.relpath)
                return
            logger.warning("rejected %s: %s", f.relpath, exc.reason)
            self.store.record_file(
                f.relpath,
                f.size,
                f.mtime_ns,
                "rejected",
                exc.reason,
                now,
                message=self._reject_message(f.relpath, exc.reason, None),
            )
            self.publisher.wake()
        else:
            status = self.store.add_instance(f.relpath, f.size, f.mtime_ns, record, now)
            logger.info(
                "instance %s of study %s (%s, %s): %s",
                record.sop_instance_uid,
                record.study_instance_uid,
                record.modality,
                record.view,
                status,
            )
        source.mark_handled(f)

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
                    # at most a batch per scan: a steady stream, however many files wait
                    for f in self.watcher.scan(time.monotonic()):
                        if self._stop.is_set():
                            break
                        self._handle_file(f)
                    more = self._intake_received() or self.watcher.more_ready
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
                    self.last_error, failed = f"intake: {type(exc).__name__}: {exc}", True
                    logger.exception("intake step failed")
                if failed:
                    self._stop.wait(interval)
                elif not more:
                    self.watcher.wait(interval)  # woken early by inotify events or stop()
        finally:
            self.watcher.close()

    # -- scoring ----------------------------------------------------------------------------

    def _score_one(self, uid: str) -> None:
        study = self.store.study(uid)
        if study is None or study.state != "complete":
            return
        instances = self.store.instances(uid)
        self._scoring_idle.clear()  # the narrative thread waits: flags first
        try:
            scored = self.scorer.score(study, instances, self.store.rejected_count(uid))
        finally:
            self._scoring_idle.set()
        if scored is None:
            logger.info("stopping: study %s left complete, scored at next start", uid)
            return
        result = scored.result
        job = None
        if self.narrator is not None and scored.narrative_source is not None:
            result = result.model_copy(update={"narrative_status": "pending"})
            job = NarrativeJob(
                result.alert_id,
                uid,
                result.revision,
                scored.narrative_source.to_json(),
                time.time() + self.narrator.budget_seconds,
            )
        rejects = [
            self._reject_message(inst.path, reason, inst.sop_instance_uid)
            for inst, reason in scored.rejected
        ]
        message = Message(
            "result", self._topic(f"study/{uid}"), result.to_json_bytes(), result.alert_id
        )
        if self.store.commit_result(
            study, result.triage, message, scored.instance_states, rejects, time.time(), job
        ):
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
        else:
            logger.info("study %s changed while it was scored; it will be scored again", uid)

    def _scoring_loop(self) -> None:
        while not self._stop.is_set():
            try:
                uid = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            with self._queued_lock:
                self._queued.discard(uid)
            try:
                self._score_one(uid)
            except EdgeTriageError as exc:
                self.last_error = str(exc)
                logger.error("scoring study %s failed: %s", uid, exc)
            except Exception as exc:
                self.last_error = f"scoring: {type(exc).__name__}: {exc}"
                logger.exception("scoring study %s failed", uid)

    # -- lifecycle --------------------------------------------------------------------------

    def healthy(self) -> bool:
        return (
            all(t.is_alive() for t in self._threads)
            and self.publisher.healthy()
            and (self.receiver is None or self.receiver.healthy())
        )

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
                self.last_error = f"renotify: {type(exc).__name__}: {exc}"
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
        self.store.close()
        self.notifier.close()
        logger.info("edge-agent stopped")
