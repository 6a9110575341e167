"""Prometheus text read back into samples: what `/metrics` serves, over HTTP or straight from
a state database's registry."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.metrics import registry_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(metric name, sorted labels) -> value."""


def samples(text: str) -> Samples:
    """Every sample of the exposition ``text``."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def served(port: int) -> str:
    """The text the metrics server on loopback ``port`` serves at /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def of_state(database: Path) -> Samples:
    """The samples /metrics would serve for the state ``database``."""
    return samples(generate_latest(registry_for(database)).decode())
