"""What the PACS tests share: a study of real files recorded and scored as the daemon does
(its result queued for the PACS), and a PACS in this process (a pynetdicom Storage SCP) that
keeps and counts what it is sent, answers chosen statuses, can abort an association
mid-C-STORE, and lets a test act at an exact point of a C-STORE."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import EnhancedSRStorage, Verification  # type: ignore[attr-defined]

from edge_agent.config import PacsSettings
from edge_agent.devbroker import HOST, free_port
from edge_agent.results import StudyResult
from edge_agent.simulate.dicom_writer import chest_instance, new_study, write_instance
from edge_agent.store import InstanceRecord, Message, Store
from edge_agent.workers.pacs import PacsWorker
from export.findings import default_findings_path, load_findings

from .delivery import BASE, make_result

CONCEPTS = {f.code: f.concept for f in load_findings(default_findings_path())}
"""The shipped radiograph findings' codes, as the daemon hands them to its PACS worker."""


def worker_for(
    store: Store, watch: Path, settings: PacsSettings, stop: threading.Event
) -> PacsWorker:
    """The daemon's PACS worker for ``store`` (the images in ``watch``) with ``settings``."""
    return PacsWorker(
        store, settings, concepts=CONCEPTS, agent="site/box", watch_dir=watch, stop=stop
    )


@contextlib.contextmanager
def worker_running(
    store: Store, watch: Path, settings: PacsSettings
) -> Iterator[tuple[PacsWorker, threading.Event, threading.Thread]]:
    """:func:`worker_for` in its own thread ``pacs``, as the daemon runs it: (worker, its stop
    event, the thread); stopped and joined (10 s) on the way out."""
    stop = threading.Event()
    worker = worker_for(store, watch, settings, stop)
    thread = threading.Thread(target=worker.run, name="pacs", daemon=True)
    thread.start()
    try:
        yield worker, stop, thread
    finally:
        stop.set()
        thread.join(10)


def commit_study(
    store: Store, watch: Path, triage: str, seed: int, images: int = 1
) -> tuple[StudyResult, list[str]]:
    """A study of real files in ``watch``, recorded and scored as the daemon does."""
    rng = np.random.default_rng(seed)
    study = new_study(rng, "CR")
    now = time.time()
    sops = []
    for i in range(images):
        ds = chest_instance(rng, findings={}, study=study, rows=64, cols=64, instance_number=i + 1)
        path = write_instance(ds, watch)
        record = InstanceRecord(ds.SOPInstanceUID, study.study_instance_uid, None, "CR", "frontal")
        rel = path.relative_to(watch).as_posix()
        assert store.add_instance(rel, 1, 1, record, now) == "accepted"
        sops.append(ds.SOPInstanceUID)
    store.complete_quiet_studies(0.0, now)
    row = store.study(study.study_instance_uid)
    assert row is not None
    result = make_result(study.study_instance_uid, row.revision, triage)
    msg = Message(
        "result", f"{BASE}/study/{row.study_instance_uid}", result.to_json_bytes(), result.alert_id
    )
    assert store.commit_result(row, triage, msg, {s: ("scored", None) for s in sops}, [], now)
    return result, sops


class Received(NamedTuple):
    sop_instance_uid: str
    study: str  # Study Instance UID
    encoded: bytes  # the data set as the agent sent it


class StorageScp:
    """A PACS in the test's own process: a pynetdicom Storage SCP (AE ``ae_title``) for
    ``classes`` on a free loopback port, for tests that count what reaches a PACS or must act
    at an exact point of a C-STORE.

    Each C-STORE gets ``statuses[its SOP Instance UID]``, else ``status`` (success by
    default; ``error_comment`` goes with a failure). ``abort_at`` holds the 1-based numbers
    of the C-STORE requests (over the SCP's life) whose association is aborted before any
    answer. ``before_answer(number)`` runs first in each request's handler;
    ``on_store(item)`` runs after a data set answered with success is kept and before the
    answer is sent (a test kills the agent there, or locks its database).

    ``received`` keeps, in order, every data set answered with success (the bytes that came
    over the wire), ``stored`` their SOP Instance UIDs; :meth:`instances` is what a PACS that
    keeps the first copy of each SOP Instance UID holds (Orthanc's default,
    ``OverwriteInstances: false``). ``associations``, ``released`` and ``requests`` count
    the associations opened and released by the peer and the C-STORE requests.
    :meth:`agent_has_answer` says when the agent has the answer to its first C-STORE."""

    def __init__(
        self,
        classes: Iterable[str] = (EnhancedSRStorage, Verification),
        *,
        ae_title: str = "PACS",
        status: int = 0x0000,
        error_comment: str | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.status = status
        self.error_comment = error_comment
        self.statuses: dict[str, int] = {}
        self.abort_at: set[int] = set()
        self.before_answer: Callable[[int], None] | None = None
        self.on_store: Callable[[Received], None] | None = None
        self.received: list[Received] = []
        self.associations = 0
        self.released = 0
        self.requests = 0
        self.answered: list[int] = []  # the agent's port, per C-STORE answer sent
        self._answering: set[int] = set()
        self._lock = threading.Condition()
        ae = AE(ae_title=ae_title)
        for sop_class in classes:
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(
            (HOST, self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_ESTABLISHED, self._opened),
                (evt.EVT_DATA_SENT, self._sent),
                (evt.EVT_RELEASED, self._released),
            ],
        )

    @property
    def stored(self) -> list[str]:
        with self._lock:
            return [item.sop_instance_uid for item in self.received]

    def _opened(self, event: Any) -> None:
        with self._lock:
            self.associations += 1

    def _store(self, event: Any) -> Dataset:
        with self._lock:
            self.requests += 1
            number = self.requests
        if self.before_answer is not None:
            self.before_answer(number)
        rsp = Dataset()
        if number in self.abort_at:
            # From another thread, as a PACS that goes away would: no answer is ever sent.
            threading.Thread(target=event.assoc.abort, daemon=True).start()
            deadline = time.monotonic() + 5
            while not event.assoc.is_aborted and time.monotonic() < deadline:
                time.sleep(0.01)
            rsp.Status = 0xA700  # never reaches the SCU: the association is gone
            return rsp
        uid = str(event.request.AffectedSOPInstanceUID)
        rsp.Status = self.statuses.get(uid, self.status)
        if rsp.Status != 0x0000:
            if self.error_comment is not None:
                rsp.ErrorComment = self.error_comment
            return rsp
        ds: Dataset = event.dataset
        item = Received(uid, str(ds.StudyInstanceUID), event.request.DataSet.getvalue())
        with self._lock:
            self.received.append(item)
            self._lock.notify_all()
        if self.on_store is not None:
            self.on_store(item)
        with self._lock:
            self._answering.add(id(event.assoc))  # the next data sent is the answer
        return rsp

    def _sent(self, event: Any) -> None:
        with self._lock:
            if id(event.assoc) in self._answering:
                self._answering.discard(id(event.assoc))
                self.answered.append(int(event.assoc.requestor.port))
                self._lock.notify_all()

    def _released(self, event: Any) -> None:
        with self._lock:
            self.released += 1
            self._lock.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Until ``predicate()`` (called under the SCP's lock) holds; AssertionError after
        ``timeout`` seconds."""
        with self._lock:
            if not self._lock.wait_for(predicate, timeout):
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")

    def agent_has_answer(self) -> bool:
        """The agent has the answer to the first C-STORE: it released that association, or
        the answer was sent, acknowledged by its kernel and read by the agent (should it
        keep the association open)."""
        with self._lock:
            if self.released:
                return True
            if not self.answered:
                return False
            agent_port = self.answered[0]
        queues = _tcp_queues()
        ours = queues.get((self.port, agent_port))  # tx: sent, not acknowledged
        theirs = queues.get((agent_port, self.port))  # rx: received, not read
        return ours is not None and theirs is not None and ours[0] == 0 and theirs[1] == 0

    def instances(self) -> dict[str, Received]:
        """SOP Instance UID -> the first copy received."""
        with self._lock:
            kept: dict[str, Received] = {}
            for item in self.received:
                kept.setdefault(item.sop_instance_uid, item)
            return kept

    def close(self) -> None:
        self.server.shutdown()


def _tcp_queues() -> dict[tuple[int, int], tuple[int, int]]:
    """(local port, remote port) -> (tx_queue, rx_queue) of the IPv4 TCP sockets
    (``/proc/net/tcp``, Linux)."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        tx, rx = (int(q, 16) for q in queues.split(":"))
        out[(int(local.split(":")[1], 16), int(remote.split(":")[1], 16))] = (tx, rx)
    return out
