"""The composition root: builds the road's workers and owns their threads.

    watch folder ─▶ intake thread ─▶ store (instances, studies) ─▶ quiet timer
        ─▶ scoring thread (imaging, runner, triage) ─▶ store (result + outbox)
        ─▶ publisher (paho) ─▶ broker ─▶ PUBACK ─▶ outbox row deleted
    urgent result ─▶ store (narrative job) ─▶ narrative thread (MedGemma, paused while a
        study is scored) ─▶ store (next revision + outbox) ─▶ publisher

Each arrow that crosses a thread goes through the SQLite store, so a crash at any point
resumes where it stopped: complete studies are scored again, unacknowledged messages are
published again with the same content. The few things threads share besides the store (a
stop event, the queue of complete studies, the scoring-idle flag, each thread's last error,
wake-ups) are listed in :mod:`edge_agent.workers.shared`; the workers themselves are in
``edge_agent/workers/`` (intake, scoring), ``narrative.py``, ``health.py`` and ``mqtt/``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__
from .bundle import Bundle
from .config import Settings
from .errors import ConfigError, describe
from .health import HealthMonitor
from .identifiers import FILE_ID_KEY
from .intake.scp import ReceivedFolder, StorageSCP
from .intake.watcher import FolderWatcher, ReadyFile
from .mqtt import Ack, Publisher
from .narrative import NarrativeWorker
from .notify import Notifier

# bundle_path and demo_bundle_path stay importable from here (demo, tests, benchmarks).
from .preflight import bundle_path as bundle_path
from .preflight import demo_bundle_path as demo_bundle_path
from .preflight import preflight
from .profiles import Profile
from .runners import Runner, open_runner
from .runners.onnxruntime import available_providers
from .scoring import Scorer
from .status import scores_section
from .store import AckOutcome, open_state
from .waiting import ScoringWaits
from .workers import IntakeWorker, Naming, ScoringWorker, Shared

if TYPE_CHECKING:  # imported when pacs.enabled: highdicom is not loaded otherwise
    from .workers.pacs import PacsWorker

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0
SCP_STOP_SECONDS = 3.0  # part of STOP_GRACE_SECONDS: stores being written may finish


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
    """The daemon, the composition root: builds the workers (``edge_agent/workers/``, the
    narrative and health workers, the publisher, the C-STORE receiver), owns their threads,
    the watchdog and the stop. ``run()`` blocks until ``stop()`` (or a signal handler
    calling it). What the threads share besides the store is :class:`Shared`."""

    def __init__(self, settings: Settings, components: Components | None = None) -> None:
        self.settings = settings
        self.components = components or prepare(settings)
        self.bundle = self.components.bundle
        self.profile = self.components.profile
        self.store, aside = open_state(
            settings.state_dir / "state.sqlite3",
            outbox_max_messages=settings.mqtt.outbox_max_messages,
            pacs_levels=settings.pacs.levels if settings.pacs.enabled else (),
        )
        self.shared = Shared()
        if aside is not None:
            damaged = f"state database was damaged: set aside as {aside.name}"
            self.shared.errors.set("start", damaged)
        self._file_id_key = self.store.secret(FILE_ID_KEY)
        self.naming = Naming(
            settings.topic_base, self._file_id_key, publish_paths=settings.phi.publish_paths
        )
        self.runner: Runner = open_runner(
            self.bundle, self.profile, cache_dir=settings.state_dir / "engine-cache"
        )
        self.waits = ScoringWaits(settings.state_dir)
        self.scorer = Scorer(
            self.bundle,
            self.runner,
            settings.watch_dir,
            batch_size=self.profile.runtime.batch_size,
            publish_accession=settings.phi.publish_accession_number,
            should_stop=self.shared.stop.is_set,
            selection=settings.selection,
        )
        intake = settings.intake
        self.watcher = FolderWatcher(
            settings.watch_dir,
            stable_seconds=intake.file_stable_seconds,
            ignore_suffixes=intake.ignore_suffixes,
            handled=self.store.file_signatures(),
            watch_mode=intake.watch_mode,
            poll_interval=intake.poll_interval_seconds,
            rescan_seconds=intake.rescan_seconds,
            retry_max=intake.retry_max_seconds,
            shown=self.naming.file_name,
        )
        self.publisher = Publisher(
            settings, self.store, status=self.status_fields, on_ack=self._on_ack
        )
        self.notifier = Notifier()
        # The box's temperatures, clocks, memory and free space, read by the "health" thread;
        # below the state disk's floor the intake waits (health.intake_paused).
        self.health = HealthMonitor(
            self.profile.health,
            settings.state_dir,
            settings.watch_dir,
            notify=lambda paused: self.notifier.status(paused or self._summary),
        )
        # scp.enabled: the DICOM Storage SCP writes what modalities push into a folder of its
        # own, the intake's second root (edge_agent/intake/scp.py).
        self.receiver: StorageSCP | None = None
        self.received: ReceivedFolder | None = None
        folder = settings.scp.receive_folder(settings.state_dir)
        if settings.scp.enabled:
            self.received = ReceivedFolder(folder, handled=self.store.file_signatures())
        self.intake = IntakeWorker(
            self.store,
            self.watcher,
            self.received,
            self.naming,
            self.shared,
            poll_interval=intake.poll_interval_seconds,
            stall_seconds=intake.stall_seconds,
            quiet_seconds=settings.study_quiet_seconds,
            paused=lambda: self.health.intake_paused,
            published=self.publisher.wake,
        )
        if self.received is not None:
            self.receiver = StorageSCP(settings.scp, folder, on_stored=self.intake.on_received)
        self.narrator = self._narrative_worker()
        self.pacs = self._pacs_worker()
        self.scoring = ScoringWorker(
            self.store,
            self.scorer,
            self.waits,
            self.naming,
            self.shared,
            narratives=self.narrator,
            published=self._result_stored,
        )
        self._summary = "starting"
        self._metrics: Any = None
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
            scoring_idle=self.shared.scoring_idle,
            stop=self.shared.stop,
            topic=lambda uid: self.naming.topic("study", uid),
            published=self._result_stored,
        )

    def _result_stored(self) -> None:
        """A result (or revision) was committed: both destinations look at once (the PACS
        worker would otherwise find its row at its next poll, up to a second later)."""
        self.publisher.wake()
        if self.pacs is not None:
            self.pacs.wake()

    def _pacs_worker(self) -> PacsWorker | None:
        """The PACS thread (``pacs.enabled``): the outbox's second destination."""
        if not self.settings.pacs.enabled:
            return None
        from .pacs.scu import PacsError
        from .preflight import pacs_problem
        from .workers.pacs import PacsWorker

        try:
            return PacsWorker(
                self.store,
                self.settings.pacs,
                concepts={f.code: f.concept for f in self.bundle.manifest.findings},
                agent=f"{self.settings.site}/{self.settings.device_id}",
                watch_dir=self.settings.watch_dir,
                stop=self.shared.stop,
            )
        except PacsError as exc:  # the TLS files
            raise pacs_problem(exc.reason) from exc

    # One step of a worker, as tests drive it (the workers' own names are public).
    def _handle_file(self, f: ReadyFile) -> None:
        self.intake.handle_file(f)

    def _intake_received(self) -> bool:
        return self.intake.intake_received()

    def _score_one(self, uid: str) -> bool:
        return self.scoring.score_one(uid)

    def _topic(self, *levels: str) -> str:
        return self.naming.topic(*levels)

    # -- status -----------------------------------------------------------------------------

    @property
    def last_error(self) -> str | None:
        """The newest error of the intake, scoring and main threads (and of the start)."""
        return self.shared.errors.latest()

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
            # the daily tallies, as `edge-agent status --json` gives them: no UID, days only
            scores=scores_section(self.store.recent_tallies(time.time())),
        )
        if self.narrator is not None:
            fields["narrative_last_error"] = self.narrator.last_error or self.narrator.load_error
        if self.pacs is not None:
            fields["pacs_last_error"] = self.pacs.last_error
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
        stall = self.intake.stall()
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
        error = f"not healthy: {reason}"
        self.shared.errors.set("main", error)
        self.notifier.status(f"NOT HEALTHY: {reason}; watchdog pings stopped")
        logger.error(
            "%s; watchdog pings stop (systemd restarts the agent where WatchdogSec is set)",
            error,
        )

    # -- lifecycle --------------------------------------------------------------------------

    def healthy(self) -> bool:
        return not self._problems()

    def run(self) -> None:
        for uid in self.store.studies_in_state("complete"):
            self.shared.studies.put(uid)  # complete before a restart, not yet scored
        if self.receiver is not None:
            self.receiver.start()  # binds first: a busy port stops the start with its key
        self.health.update()  # the first reading before intake starts (a full disk waits)
        self.publisher.start()
        if self.settings.metrics.port:
            self._start_metrics()
        stop = self.shared.stop
        workers: list[tuple[str, Callable[[], None]]] = [
            (self.intake.name, self.intake.run),
            (self.scoring.name, self.scoring.run),
            ("health", lambda: self.health.run(stop)),
        ]
        if self.narrator is not None:
            workers.append(("narrative", self.narrator.run))
        if self.pacs is not None:
            workers.append((self.pacs.name, self.pacs.run))
        self._threads = [threading.Thread(target=w, name=n, daemon=True) for n, w in workers]
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
        while not stop.wait(min(ping or 1.0, 1.0)):
            try:
                self._renotify()
            except Exception as exc:  # the store failed; next second tries again
                self.shared.errors.set("main", f"renotify: {describe(exc)}")
                logger.exception("queueing re-notifications failed")
            self._watch_health()
            if ping and time.monotonic() >= next_ping and self._healthy:
                self.notifier.watchdog()
                next_ping = time.monotonic() + ping
        self._shutdown()

    def stop(self) -> None:
        self.shared.stop.set()
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
