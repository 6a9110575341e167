"""edge_agent.mqtt.flight: the in-flight bookkeeping, without paho's client or a broker.

The races it settles (a PUBACK before publish() has returned the mid, two copies of a row
acknowledged in either order, a client replaced with copies pending) are driven here one
step at a time, in every order hypothesis finds."""

from __future__ import annotations

import threading
import time

from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.mqtt.flight import STATUS_OWNER, Flight
from edge_agent.store import OutboxMessage

OK = ReasonCode(PacketTypes.PUBACK, "Success")
REFUSED = ReasonCode(PacketTypes.PUBACK, "Not authorized")
SESSION = object()


def row(message_id: int) -> OutboxMessage:
    return OutboxMessage(message_id, f"p/study/1.2.{message_id}", b"{}", 1)


def flight() -> Flight:
    f = Flight()
    f.new_session(SESSION)
    return f


def publish(f: Flight, message: OutboxMessage, mid: int, *, resend: bool = False) -> bool:
    """What the sender does: enter, publish (mid), record; True when tracked."""
    entered = f.enter(message, resend=resend)
    assert entered is not None
    entry, _ = entered
    if f.sent(SESSION, entry, mid, broken=False):
        assert f.track(SESSION, mid, message.id) is None
        return True
    return False


def test_an_accepted_puback_moves_the_row_from_flight_to_deleting() -> None:
    f = flight()
    assert publish(f, row(1), mid=7)
    assert len(f) == 1 and f.busy()
    owner, entry = f.puback(7, OK) or (None, None)
    assert owner == 1 and entry is not None and entry.message.id == 1
    assert len(f) == 0 and f.busy()  # being deleted: still excluded from the next batch
    assert f.room(5) == (5, {1})
    f.deleted(1)
    assert not f.busy() and f.room(5) == (5, set())


def test_a_puback_before_publish_returned_is_claimed_by_track() -> None:
    f = flight()
    entered = f.enter(row(1), resend=False)
    assert entered is not None
    assert f.puback(9, OK) is None  # paho's thread was faster than publish()'s return
    assert f.sent(SESSION, entered[0], 9, broken=False)
    assert f.track(SESSION, 9, 1) is OK  # the caller settles it now
    assert f.puback(9, OK) == (1, entered[0])


def test_the_second_copy_of_a_row_is_stale_once_the_first_is_acknowledged() -> None:
    f = flight()
    assert publish(f, row(1), mid=1)
    assert publish(f, row(1), mid=2, resend=True)  # PUBACK overdue: published again
    assert f.puback(2, OK) is not None
    assert f.puback(1, OK) is None  # the other copy's PUBACK: ignored, not unclaimed
    f.deleted(1)
    assert not f.busy()


def test_a_copy_published_after_the_row_was_acknowledged_is_stale() -> None:
    f = flight()
    assert publish(f, row(1), mid=1)
    entered = f.enter(row(1), resend=True)
    assert entered is not None
    assert f.puback(1, OK) is not None  # acknowledged while the copy was being published
    assert not f.sent(SESSION, entered[0], 2, broken=False)
    assert f.puback(2, OK) is None
    assert f.enter(row(1), resend=True) is None  # a resend finds nothing to resend


def test_a_new_session_forgets_the_mids_of_the_old_client() -> None:
    f = flight()
    assert publish(f, row(1), mid=1)
    assert f.connection_lost() == [row(1)]
    f.new_session(object())
    assert f.track(SESSION, 1, 1) is None  # the old client's mids are not recorded
    assert f.puback(1, OK) is None
    assert len(f) == 0 and not f.busy()


def test_a_row_published_as_the_connection_breaks_leaves_flight() -> None:
    f = flight()
    entered = f.enter(row(1), resend=False)
    assert entered is not None
    assert not f.sent(SESSION, entered[0], 1, broken=True)
    assert len(f) == 0


def test_a_refused_row_is_held_until_its_time() -> None:
    f = flight()
    assert publish(f, row(1), mid=1)
    owner, entry = f.puback(1, REFUSED) or (None, None)
    assert owner == 1 and entry is not None
    assert not f.busy()  # refused rows are not deleted
    f.hold(1, time.monotonic() + 60)
    assert f.room(3) == (3, {1}) and f.busy(held=True)
    f.purge(time.monotonic())
    assert f.room(3) == (3, {1})
    f.purge(time.monotonic() + 61)
    assert f.room(3) == (3, set())


def test_status_mids_have_their_own_owner() -> None:
    f = flight()
    f.track(SESSION, 5, STATUS_OWNER)
    assert f.puback(5, OK) == (STATUS_OWNER, None)


def test_connection_lost_gives_the_rows_oldest_first_and_wakes_waiters() -> None:
    f = flight()
    for mid, message_id in enumerate([3, 1, 2], start=1):
        assert publish(f, row(message_id), mid=mid)
    done = threading.Event()

    def wait() -> None:
        f.wait_settled(10.0, lambda: True)
        done.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert [m.id for m in f.connection_lost()] == [1, 2, 3]
    waiter.join(5)
    assert done.is_set() and len(f) == 0


def test_overdue_and_next_due() -> None:
    f = flight()
    assert f.next_due(30.0) is None
    assert publish(f, row(1), mid=1)
    now = time.monotonic()
    assert f.overdue(now, 30.0) == []
    (due,) = [f.next_due(30.0)]
    assert due is not None and now + 29 < due <= now + 30
    [(message, age)] = f.overdue(now + 31, 30.0)
    assert message.id == 1 and age >= 31 - 0.5
    f.restart_clocks()
    assert f.overdue(now + 1, 30.0) == []


@given(
    order=st.permutations(["return1", "ack1", "return2", "ack2"]),
    acked=st.sampled_from(["ack1", "ack2"]),
)
def test_two_copies_settle_the_row_exactly_once_in_any_order(order: list[str], acked: str) -> None:
    """Two copies of one row (a resend), each publish() returning its mid and each PUBACK
    arriving in any order (a PUBACK before its publish() returned included): the row is
    settled once, and nothing is left in flight or owned."""
    f = flight()
    pending = {}
    for copy in (1, 2):
        entered = f.enter(row(1), resend=copy == 2)
        assert entered is not None
        pending[copy] = entered[0]
    settled = []
    for step in order:
        copy = int(step[-1])
        if step.startswith("return"):
            if f.sent(SESSION, pending[copy], copy, broken=False):
                early = f.track(SESSION, copy, 1)
                if early is not None:
                    settled.append(f.puback(copy, early))
        else:
            settled.append(f.puback(copy, OK))
    owners = [s[0] for s in settled if s is not None and s[1] is not None]
    assert owners == [1]
    f.deleted(1)
    assert not f.busy() and len(f) == 0
    assert f.puback(1, OK) is None and f.puback(2, OK) is None  # no mid has an owner left
