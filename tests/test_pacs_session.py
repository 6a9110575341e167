"""The PACS worker's cost to the rest of the agent: the waiting SRs go over one association
(a pynetdicom SCP in this process counts them), a failure stays with its own row (a refusal
by status, an association aborted mid-batch: the rest is sent, none lost, none twice), the
association is released when idle, the socket is tuned against Nagle's stalls, and the
thread runs niced."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.delivery import make_result
from helpers.pacs import CONCEPTS, StorageScp, commit_study, worker_for, worker_running
from helpers.polling import wait_until
from pynetdicom.sop_class import EnhancedSRStorage  # type: ignore[attr-defined]

from edge_agent.config import PacsSettings
from edge_agent.devbroker import HOST
from edge_agent.pacs.scu import Peer, Session
from edge_agent.pacs.sr import build_sr, sop_instance_uid
from edge_agent.results import StudyResult
from edge_agent.simulate.dicom_writer import chest_instance, new_study
from edge_agent.status import read_status
from edge_agent.store import Store
from edge_agent.workers.pacs import LINGER_SECONDS, NICE

LEVELS = ("urgent", "review")


@pytest.fixture
def scp() -> Iterator[StorageScp]:
    server = StorageScp([EnhancedSRStorage], ae_title="FUSSY")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    folder = tmp_path / "incoming"
    folder.mkdir()
    return folder


def fussy(port: int) -> PacsSettings:
    """The PACS of AE title FUSSY on loopback ``port``."""
    return PacsSettings(enabled=True, host=HOST, port=port, called_ae="FUSSY", timeout_seconds=3)


def queue(st: Store, watch: Path, n: int, first: int = 0) -> list[StudyResult]:
    """``n`` results queued for the PACS, oldest first (the order the worker sends them)."""
    results = []
    for i in range(first, first + n):
        results.append(commit_study(st, watch, "urgent" if i % 2 else "review", i)[0])
        time.sleep(0.002)  # distinct creation times: a deterministic order
    return results


def test_waiting_rows_go_over_one_association(tmp_path: Path, watch: Path, scp: StorageScp) -> None:
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    results = queue(st, watch, 6)
    worker = worker_for(st, watch, fussy(scp.port), threading.Event())
    try:
        assert worker.step(time.time())
    finally:
        worker.close()
    assert st.pacs_depth() == 0 and worker.last_error is None
    assert sorted(scp.stored) == sorted(sop_instance_uid(r) for r in results)
    assert scp.associations == 1
    wait_until(lambda: scp.released == 1, 5, "the association released")
    st.close()


def test_an_association_aborted_mid_batch_fails_that_row_alone(
    tmp_path: Path, watch: Path, scp: StorageScp
) -> None:
    """The PACS aborts during the third C-STORE: that row keeps its failure and back-off,
    the three after it go over a new association at once, and the third arrives on its
    retry: every SR once, none lost, the stored counter exact."""
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    results = queue(st, watch, 6)
    uids = [sop_instance_uid(r) for r in results]
    scp.abort_at = {3}
    worker = worker_for(st, watch, fussy(scp.port), threading.Event())
    try:
        before = time.time()
        assert worker.step(before)
        assert scp.stored == uids[:2] + uids[3:]
        assert scp.associations == 2
        (left,) = st.pacs_due(before + 60.0)
        assert left.alert_id == results[2].alert_id and left.attempts == 1
        reason = "no answer to C-STORE (association closed or timed out)"
        assert read_status(st.path).pacs_last_error == reason
        assert st.pacs_due(time.time()) == []  # its own back-off (2 s); the rest went on
        assert worker.step(time.time() + 3.0)
    finally:
        worker.close()
    assert st.pacs_depth() == 0
    assert scp.stored == uids[:2] + uids[3:] + [uids[2]]
    assert read_status(st.path).counters.get("pacs_stored") == 6
    assert read_status(st.path).counters.get("pacs_failed_attempts") == 1
    st.close()


def test_a_refusal_by_status_is_its_rows_and_keeps_the_association(
    tmp_path: Path, watch: Path, scp: StorageScp
) -> None:
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    results = queue(st, watch, 4)
    refused = sop_instance_uid(results[1])
    scp.statuses = {refused: 0xA700}
    worker = worker_for(st, watch, fussy(scp.port), threading.Event())
    try:
        assert worker.step(time.time())
    finally:
        worker.close()
    (left,) = st.pacs_due(time.time() + 60.0)
    assert left.alert_id == results[1].alert_id and left.attempts == 1
    assert (
        read_status(st.path).pacs_last_error == "C-STORE refused: out of resources (status 0xA700)"
    )
    assert sorted(scp.stored) == sorted(sop_instance_uid(r) for r in results if r != results[1])
    assert scp.associations == 1
    st.close()


def test_the_worker_releases_the_association_when_idle_and_reopens_it(
    tmp_path: Path, watch: Path, scp: StorageScp
) -> None:
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    with worker_running(st, watch, fussy(scp.port)) as (worker, _, thread):
        queue(st, watch, 3)
        worker.wake()
        wait_until(lambda: st.pacs_depth() == 0, 20, "three SRs stored")
        wait_until(lambda: scp.released == 1, LINGER_SECONDS + 5, "the idle association released")
        queue(st, watch, 1, first=3)
        worker.wake()
        wait_until(lambda: st.pacs_depth() == 0, 20, "a fourth SR stored")
        assert scp.associations == 2
    assert not thread.is_alive()
    wait_until(lambda: scp.released == 2, 5, "the association released at stop")
    assert len(scp.stored) == len(set(scp.stored)) == 4
    st.close()


def test_the_association_socket_sends_without_nagle(scp: StorageScp) -> None:
    """pynetdicom writes a C-STORE request's command and data set as two PDUs; with Nagle's
    algorithm on, the second waits for the PACS's delayed ACK of the first (~40 ms on
    Linux, each C-STORE)."""
    rng = np.random.default_rng(1)
    study = new_study(rng, "CR")
    image = chest_instance(rng, findings={}, study=study, rows=64, cols=64)
    result = make_result(study.study_instance_uid, 1, "urgent")
    sr = build_sr(result, [image], concepts=CONCEPTS, agent="box-1")
    peer = Peer(host=HOST, port=scp.port, called_ae="FUSSY", calling_ae="EDGETRIAGE", timeout=3)
    with Session(peer) as session:
        session.store(sr)
        assert session.is_open
        sock = session._assoc.dul.socket.socket  # type: ignore[union-attr]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert not session.is_open


def stat_of(pid: int, tid: int) -> list[str]:
    """Fields 3 onwards of thread ``tid`` of process ``pid`` (stat(5))."""
    return Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()


def nice_of(pid: int, tid: int) -> int:
    """The nice value of thread ``tid`` of process ``pid``, as the kernel reports it."""
    return int(stat_of(pid, tid)[19 - 3])


def policy_of(pid: int, tid: int) -> int:
    """The scheduling policy of thread ``tid`` of process ``pid`` (os.SCHED_*)."""
    return int(stat_of(pid, tid)[41 - 3])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux procfs")
def test_the_sr_work_runs_in_a_niced_idle_scheduled_process(
    tmp_path: Path, watch: Path, scp: StorageScp
) -> None:
    """The SR is built and sent in the sender process, every thread of which (pynetdicom's
    included) runs NICE steps below the agent and under SCHED_IDLE; the agent's own
    threads are left alone."""
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    queue(st, watch, 1)
    worker = worker_for(st, watch, fussy(scp.port), threading.Event())
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    try:
        assert worker.step(time.time())
        child = worker.sender.release()
        assert child is not None and child != os.getpid()
        threads = [int(t.name) for t in Path(f"/proc/{child}/task").iterdir()]
        assert threads and all(nice_of(child, t) == min(19, mine + NICE) for t in threads)
        assert all(policy_of(child, t) == os.SCHED_IDLE for t in threads)
        agent = [t.native_id or 0 for t in threading.enumerate()]
        assert {nice_of(os.getpid(), t) for t in agent} == {mine}
        assert {policy_of(os.getpid(), t) for t in agent} == {os.SCHED_OTHER}
    finally:
        worker.close()
    assert len(scp.stored) == 1
    st.close()


def test_a_sender_process_killed_mid_c_store_fails_that_row_alone(
    tmp_path: Path, watch: Path, scp: StorageScp
) -> None:
    """SIGKILL of the sender process while its second C-STORE waits for the PACS: that row
    keeps a failure, the rows after it go through a new sender process; a sender killed
    while idle costs no row anything."""
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    results = queue(st, watch, 4)
    uids = [sop_instance_uid(r) for r in results]
    worker = worker_for(st, watch, fussy(scp.port), threading.Event())
    child: list[int] = []

    def kill_sender(number: int) -> None:
        if number == 2:
            os.kill(child[0], signal.SIGKILL)
            time.sleep(0.5)  # no answer while it dies

    try:
        child.append(worker.sender.start())
        scp.before_answer = kill_sender
        assert worker.step(time.time())
        (left,) = st.pacs_due(time.time() + 60.0)
        assert left.alert_id == results[1].alert_id and left.attempts == 1
        assert read_status(st.path).pacs_last_error == "the PACS sender process ended unexpectedly"
        # The PACS had stored the second SR when the sender died: its retry is the same
        # instance, which a PACS keeps once (this SCP lists it twice).
        assert worker.step(time.time() + 3.0)
        assert scp.stored == [uids[0], uids[1], uids[2], uids[3], uids[1]]
        # Killed while idle: the next row goes through a new sender, no attempt lost.
        os.kill(worker.sender.start(), signal.SIGKILL)
        time.sleep(0.5)
        (fifth,) = queue(st, watch, 1, first=4)
        assert worker.step(time.time())
    finally:
        worker.close()
    assert st.pacs_depth() == 0
    assert scp.stored[-1] == sop_instance_uid(fifth)
    counters = read_status(st.path).counters
    assert counters.get("pacs_stored") == 5 and counters.get("pacs_failed_attempts") == 1
    st.close()


def test_stop_does_not_wait_for_a_slow_pacs(tmp_path: Path, watch: Path, scp: StorageScp) -> None:
    """The agent stops while the PACS takes its time over a C-STORE: the worker's thread
    ends within a second (the sender is killed), and the row is left as it was, to be sent
    at the next start."""
    st = Store(tmp_path / "state.sqlite3", pacs_levels=LEVELS)
    (result,) = queue(st, watch, 1)
    scp.before_answer = lambda number: time.sleep(4)
    with worker_running(st, watch, fussy(scp.port)) as (_, stop, thread):
        wait_until(lambda: scp.requests == 1, 20, "the C-STORE under way")
        t = time.monotonic()
        stop.set()
        thread.join(5)
        assert not thread.is_alive() and time.monotonic() - t < 2.0
    (left,) = st.pacs_due(time.time())
    assert left.alert_id == result.alert_id and left.attempts == 0
    st.close()


AGENT = """
import sys, time
from pathlib import Path
from edge_agent.config import PacsSettings
from edge_agent.pacs.sender import Sender
settings = PacsSettings(enabled=True, host="127.0.0.1", port=int(sys.argv[1]), called_ae="FUSSY")
sender = Sender(settings, concepts={}, agent="box-1", watch_dir=Path(sys.argv[2]))
print(sender.start(), flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux procfs")
def test_the_sender_ends_when_the_agent_is_killed(tmp_path: Path, scp: StorageScp) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(scp.port), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        child = int(agent.stdout.readline())
        assert Path(f"/proc/{child}").exists()
        agent.kill()
        agent.wait(5)
        wait_until(lambda: not Path(f"/proc/{child}").exists(), 5, "the orphaned sender gone")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
        if agent.stdout is not None:
            agent.stdout.close()
