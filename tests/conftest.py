from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.brokers import Mosquitto, Subscriber

# -- the environment ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's agent settings (EDGE_AGENT_*) or systemd credentials: a
    test sets what it needs with monkeypatch (daemon processes inherit the result)."""
    for key in list(os.environ):
        if key.startswith("EDGE_AGENT_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)


# -- MQTT: a real broker per test (tests/helpers/brokers.py) ---------------------------------------


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
