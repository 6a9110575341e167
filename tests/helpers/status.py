"""A state database holding one urgent result, an open study and one rejected file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_agent.store import InstanceRecord, Message, Store


def result_payload(triage: str) -> bytes:
    return json.dumps(
        {
            "triage": triage,
            "accession_number": "ACC-SECRET-1",
            "findings": [
                {"code": "pneumothorax", "score": 0.91},
                {"code": "lung_nodule", "score": 0.12},
            ],
        }
    ).encode()


def make_state(folder: Path) -> Path:
    """``folder`` made into a state folder holding that database; returns it."""
    store = Store(folder / "state.sqlite3")
    try:
        for n, study in enumerate(("1.2.3", "1.2.4")):
            record = InstanceRecord(f"{study}.1", study, f"{study}.9", "CR", "frontal")  # type: ignore[arg-type]
            store.add_instance(f"{study}.dcm", 10, 1, record, now=100.0 + n)
        store.add_instance(
            "open.dcm",
            10,
            1,
            InstanceRecord("1.2.5.1", "1.2.5", "1.2.5.9", "CR", "frontal"),  # type: ignore[arg-type]
            now=500.0,
        )
        store.complete_quiet_studies(10.0, now=200.0)
        study = store.study("1.2.3")
        assert study is not None
        message = Message("result", "p/study/1.2.3", result_payload("urgent"), "alert-1")
        assert store.commit_result(
            study, "urgent", message, {"1.2.3.1": ("scored", None)}, [], 201.0
        )
        store.record_file("junk/readme.txt", 5, 1, "rejected", "not a DICOM file", 202.0)
    finally:
        store.close()
    return folder


def cli_status(config: Path) -> dict[str, Any]:
    """``edge-agent status --config CONFIG --json`` run as a user runs it (the agent's
    ``EDGE_AGENT_*`` environment left out), parsed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    run = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout))
