"""What the PACS tests share: a study of real files recorded and scored as the daemon does
(its result queued for the PACS), and a pynetdicom Storage SCP in this process that counts
associations and stores, answers chosen statuses, and can abort an association mid-C-STORE.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from edge_agent.devbroker import HOST, free_port
from edge_agent.results import StudyResult
from edge_agent.simulate.dicom_writer import chest_instance, new_study, write_instance
from edge_agent.store import InstanceRecord, Message, Store

from .delivery import BASE, make_result


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


@dataclass
class CountingScp:
    """A Storage SCP (AE title ``FUSSY``) for ``classes`` on a free loopback port.

    ``statuses`` maps a SOP Instance UID to the status its C-STOREs get (else success);
    ``abort_at`` holds the 1-based numbers of the C-STORE requests (counted over the SCP's
    life) whose association is aborted before any answer; ``before_answer`` is called with
    each request's number before it is answered. ``stored`` lists the SOP Instance
    UIDs answered with success, in order; ``associations`` and ``released`` count the
    associations opened and released by the peer."""

    classes: list[str]
    statuses: dict[str, int] = field(default_factory=dict)
    abort_at: set[int] = field(default_factory=set)
    stored: list[str] = field(default_factory=list)
    associations: int = 0
    released: int = 0
    requests: int = 0
    before_answer: Callable[[int], None] | None = None
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        ae = AE(ae_title="FUSSY")
        for sop_class in self.classes:
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(
            (HOST, self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_ESTABLISHED, self._opened),
                (evt.EVT_RELEASED, self._released),
            ],
        )

    def _opened(self, event: Any) -> None:
        with self._lock:
            self.associations += 1

    def _released(self, event: Any) -> None:
        with self._lock:
            self.released += 1

    def _store(self, event: Any) -> Dataset | int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.requests += 1
            number = self.requests
        if self.before_answer is not None:
            self.before_answer(number)
        if number in self.abort_at:
            # From another thread, as a PACS that goes away would: no answer is ever sent.
            threading.Thread(target=event.assoc.abort, daemon=True).start()
            deadline = time.monotonic() + 5
            while not event.assoc.is_aborted and time.monotonic() < deadline:
                time.sleep(0.01)
            return 0xA700  # never reaches the SCU: the association is gone
        status = self.statuses.get(uid, 0x0000)
        if status == 0x0000:
            with self._lock:
                self.stored.append(uid)
        rsp = Dataset()
        rsp.Status = status
        return rsp

    def close(self) -> None:
        self.server.shutdown()
