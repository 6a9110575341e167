"""A PACS in the test's own process (a pynetdicom Storage SCP), for tests that must act at an
exact point of a C-STORE: ``on_store`` runs in the SCP's handler after the data set is kept
and before the status is answered (a test kills the agent there, or locks its database).

Every data set received is kept in order (``received``, as the bytes that came over the
wire); :meth:`instances` is what a PACS that keeps the first copy of each SOP Instance UID
holds (Orthanc's default, ``OverwriteInstances: false``). :meth:`agent_has_answer` says when
the agent has the answer to its first C-STORE: it released the association, or (should it
keep the association open) its kernel acknowledged the answer and it read every byte of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import EnhancedSRStorage, Verification  # type: ignore[attr-defined]

from edge_agent.devbroker import HOST, free_port


class Received(NamedTuple):
    sop_instance_uid: str
    study: str  # Study Instance UID
    encoded: bytes  # the data set as the agent sent it


class StorageScp:
    def __init__(self, ae_title: str = "PACS") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.received: list[Received] = []
        self.on_store: Callable[[Received], None] | None = None
        self.released = 0  # associations the agent released (it had every answer)
        self.answered: list[int] = []  # the agent's port, per C-STORE answer sent
        self._answering: set[int] = set()
        self._lock = threading.Condition()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(EnhancedSRStorage)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(
            (HOST, self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_DATA_SENT, self._sent),
                (evt.EVT_RELEASED, self._released),
            ],
        )

    def _store(self, event: Any) -> int:
        ds: Dataset = event.dataset
        item = Received(
            str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), event.request.DataSet.getvalue()
        )
        with self._lock:
            self.received.append(item)
            self._lock.notify_all()
        if self.on_store is not None:
            self.on_store(item)
        with self._lock:
            self._answering.add(id(event.assoc))  # the next data sent is the answer
        return 0x0000

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
        the answer was sent, acknowledged by its kernel and read by the agent."""
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
