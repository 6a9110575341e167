from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import Mosquitto, Subscriber

# -- MQTT: a real broker per test (tests/brokers.py) ---------------------------------------


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh mosquitto on a free loopback port; stopped after the test."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def subscriber(mosquitto: Mosquitto) -> Iterator[Callable[..., Subscriber]]:
    """``subscriber(topic_filter, persistent=False, broker=mosquitto)`` → a connected
    Subscriber recording messages; all are closed after the test."""
    made: list[Subscriber] = []

    def make(topic_filter: str, *, broker: Mosquitto | None = None, **kwargs: Any) -> Subscriber:
        sub = Subscriber(broker or mosquitto, topic_filter, **kwargs)
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.close()
