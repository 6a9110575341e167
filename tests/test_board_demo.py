"""``edge-agent demo`` starts the triage board too: its URL and one-time account are printed,
and the demo's results are on the board while the demo runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest
from helpers.board_peers import Http

pytestmark = pytest.mark.slow


def test_demo_prints_the_board_and_its_results_are_there() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "demo", "--studies", "2", "--no-hold"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    try:
        http: Http | None = None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"triage board: (http://\S+)/ +\(user (\S+), password (\S+);", line)
            if found:
                url, user, password = found.groups()
                http = Http(url)
                http.request("/login")
                token = http.cookie("edge_board_login")
                form = urlencode({"username": user, "password": password, "csrf": token})
                assert http.request("/login", form.encode())[0] == 303
            row = re.match(r"…(\d{12}) ", line)
            if row:
                assert http is not None, "the board's URL comes before the table"
                deadline = time.monotonic() + 5
                while True:
                    state = json.loads(http.request("/api/state")[2])
                    uids = [s["study_instance_uid"] for s in state["studies"]]
                    if any(u.endswith(row.group(1)) for u in uids):
                        break
                    assert time.monotonic() < deadline, f"{row.group(1)} not on the board"
                    time.sleep(0.1)
                assert all(s["demo"] for s in state["studies"])
                assert [b["box"] for b in state["boxes"]] == ["demo/demo-box"]
                break
        assert http is not None, "".join(lines)
        assert proc.wait(120) == 0, "".join(lines) + proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
