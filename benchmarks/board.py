"""Triage board benchmark: from the agent's PUBACK to the row in the browsers' DOM.

    .venv/bin/python benchmarks/board.py [--rate 20] [--duration 30] [--sessions 20]
                                         [--browsers N] [--history 5000] [--quick]

All real: a private Mosquitto on a loopback port, the board as its own process
(``edge-agent board``, its SQLite on disk), ``--sessions`` logged-in sessions with their event
streams open: ``--browsers`` of them (default: all) pages in headless Chromium (Debian's
``/usr/bin/chromium`` driven by Playwright), the others plain HTTP clients reading the stream
(what the server sees of a browser; their arrival times are the board's own delivery, without
a browser's rendering on this machine's CPU), and ``--history`` studies already in the
board's store (the worklist shows at most 500 of them). A publisher stands in for the
agents: a paho client (MQTT v5, QoS 1) publishing valid study results, open-loop Poisson at
``--rate`` per second, each from one of 8 boxes; 10% urgent, 20% review.

1. **Latency**: each page records, with a MutationObserver, when each row enters its
   worklist (``performance.timeOrigin + performance.now()``, the same wall clock as the
   publisher's ``time.time()``); the publisher records when each PUBACK arrived. Latency is
   DOM time minus PUBACK time, one sample per (result, page). The plain stream clients note
   when each event's line arrives. **Baseline**: a plain MQTT subscriber (paho, QoS 1) on the
   same topics, in this process: its arrival time minus the PUBACK time is the broker's own
   delivery latency.
2. **First render** with the history in the store: a fresh page's navigation start to the
   ``board-rendered`` mark the page sets once its rows are in the DOM (and the server's time
   to the first byte), ``--renders`` times.
3. **CPU per result**: the board process's user + system CPU time (``/proc/PID/stat``) over
   the latency run, minus the same length of idle time with the pages open, per result.

Prints tables, the goals (p99 < 1 s, first render < 300 ms) and the load average. Exits 0
whatever the figures; 1 when a published result never reached a page (a lost row is a bug).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.board.auth import add_user
from edge_agent.board.store import BoardStore
from edge_agent.devbroker import Mosquitto, free_port, port_open
from edge_agent.results import StudyResult, alert_id, iso, read_study_result

CHROMIUM = "/usr/bin/chromium"
PREFIX = "edge-triage/v1"
BOXES = [(f"site-{i // 4}", f"box-{i}") for i in range(8)]
USER, PASSWORD = "bench", "bench-password"
GOAL_P99_MS = 1000.0
GOAL_RENDER_MS = 300.0
SHA = "b" * 64
RENDERED = "#broker:not([data-connected='unknown'])"
"""Matches once the page's first render is done (loadState sets the broker indicator; the
Content-Security-Policy forbids the string evaluation wait_for_function would poll with)."""
RECORDER = """
window.__seen = {};
new MutationObserver(records => {
  const now = performance.timeOrigin + performance.now();
  for (const r of records) for (const n of r.addedNodes) {
    const uid = n.dataset && n.dataset.studyUid;
    if (uid && !(uid in window.__seen)) window.__seen[uid] = now;
  }
}).observe(document.getElementById("rows"), {childList: true});
"""


def payload(uid: str, triage: str, complete_at: float, rng: random.Random) -> bytes:
    score = {"urgent": 0.9, "review": 0.6}.get(triage, 0.1) + rng.random() * 0.05
    return StudyResult.model_validate(
        {
            "alert_id": alert_id(uid, 1, SHA),
            "revision": 1,
            "study_instance_uid": uid,
            "accession_number": None,
            "modality": "CR",
            "triage": triage,
            "reason": None,
            "findings": [
                {
                    "code": "pneumothorax",
                    "label": "Pneumothorax",
                    "score": score,
                    "urgent_threshold": 0.8,
                    "review_threshold": 0.5,
                    "flagged": score >= 0.5,
                }
            ],
            "model": {
                "name": "bench",
                "version": "1",
                "sha256": SHA,
                "precision": "fp32",
                "provider": "CPUExecutionProvider",
                "demo": True,
            },
            "instances": {"received": 2, "scored": 1, "rejected": 0},
            "timing": {
                "first_instance_at": iso(complete_at - 30),
                "complete_at": iso(complete_at),
                "scored_at": iso(complete_at + 1),
                "published_at": iso(complete_at + 1),
                "inference_ms": 800.0,
            },
        }
    ).to_json_bytes()


def level(rng: random.Random) -> str:
    x = rng.random()
    return "urgent" if x < 0.1 else "review" if x < 0.3 else "routine"


def uid_for(i: int, tag: str) -> str:
    return f"1.2.826.0.1.3680043.8.498.{tag}.{i}"


def fill_history(state_file: Path, n: int, rng: random.Random) -> None:
    """``n`` studies of the last 24 h in the board's store, as if received earlier."""
    store = BoardStore(state_file)
    now = time.time()
    for i in range(n):
        site, device = BOXES[i % len(BOXES)]
        body = payload(uid_for(i, "1"), level(rng), now - rng.random() * 23 * 3600, rng)
        store.add_result(site, device, read_study_result(body), body, now)
    store.close()


class Publisher:
    """The agents: one paho client publishing at QoS 1; notes each PUBACK's time."""

    def __init__(self, broker: Mosquitto) -> None:
        self.acked: dict[int, float] = {}
        self.mid_uid: dict[int, str] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="bench-agents",
            protocol=mqtt.MQTTv5,
        )
        self.client.max_inflight_messages_set(100)
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.props = Properties(PacketTypes.PUBLISH)
        self.props.ContentType = "application/json"

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self.lock:
            self.acked[mid] = time.time()

    def publish(self, site: str, device: str, uid: str, body: bytes) -> None:
        # Not under self.lock: paho calls on_publish holding its own locks, and publish()
        # takes them too (holding ours across it would deadlock).
        info = self.client.publish(
            f"{PREFIX}/{site}/{device}/study/{uid}", body, qos=1, properties=self.props
        )
        with self.lock:
            self.mid_uid[info.mid] = uid

    def puback_times(self) -> dict[str, float]:
        with self.lock:
            return {self.mid_uid[m]: t for m, t in self.acked.items() if m in self.mid_uid}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class PlainSubscriber:
    """The baseline: a paho subscriber's arrival time of each result."""

    def __init__(self, broker: Mosquitto) -> None:
        self.arrived: dict[str, float] = {}
        self.ready = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="bench-plain",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/+/+/study/+", 1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.ready.wait(5)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.arrived.setdefault(msg.topic.rsplit("/", 1)[1], time.time())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class StreamClient(threading.Thread):
    """A logged-in session reading ``/events`` over plain HTTP; notes each study's arrival."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.arrived: dict[str, float] = {}
        self.cookie = self._login()
        self.ready = threading.Event()
        self.conn: http.client.HTTPConnection | None = None

    def _login(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/login")
        response = conn.getresponse()
        response.read()
        token = response.getheader("set-cookie", "").split(";")[0]
        form = f"username={USER}&password={PASSWORD}&csrf={token.split('=', 1)[1]}"
        conn.request(
            "POST",
            "/login",
            form,
            {"Cookie": token, "Content-Type": "application/x-www-form-urlencoded"},
        )
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.getheader("set-cookie", "").split(";")[0]

    def run(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        self.conn.request("GET", "/events", headers={"Cookie": self.cookie})
        response = self.conn.getresponse()
        self.ready.set()
        event = ""
        try:
            for raw in response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "study":
                    uid = json.loads(line[6:])["study_instance_uid"]
                    self.arrived.setdefault(uid, time.time())
        except (OSError, ValueError, http.client.HTTPException):
            pass  # the socket was shut down at the end of the run
        finally:
            self.conn.close()

    def close(self) -> None:
        """Shut the socket down (the reading thread ends on it and closes the connection)."""
        sock = self.conn.sock if self.conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.join(5)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chromium_cpu_seconds() -> float:
    """User + system CPU of every Chromium process (this benchmark's browser)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(chromium)" in text or "(chrome)" in text:
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": 0}
    return {
        "n": float(a.size),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def login(context: Any, url: str) -> Any:
    page = context.new_page()
    page.goto(url + "/login")
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector(RENDERED, state="attached")
    return page


def first_renders(browser: Any, url: str, count: int) -> tuple[list[float], list[float], int]:
    context = browser.new_context()
    page = login(context, url)
    renders, ttfb = [], []
    for _ in range(count):
        page.reload()
        page.wait_for_selector(RENDERED, state="attached")
        timing = page.evaluate(
            """() => {
              const nav = performance.getEntriesByType('navigation')[0];
              const mark = performance.getEntriesByName('board-rendered')[0];
              return [mark.startTime, nav.responseStart - nav.requestStart];
            }"""
        )
        renders.append(timing[0])
        ttfb.append(timing[1])
    rows = page.evaluate("document.querySelectorAll('#rows tr').length")
    context.close()
    return renders, ttfb, rows


def machine() -> str:
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model})"


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="results per second (20)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds (30)")
    parser.add_argument("--sessions", type=int, default=20, help="open sessions (20)")
    parser.add_argument(
        "--browsers", type=int, help="of them, Chromium pages (default: all); others plain"
    )
    parser.add_argument("--history", type=int, default=5000, help="studies in the store (5000)")
    parser.add_argument("--renders", type=int, default=10, help="first renders measured (10)")
    parser.add_argument(
        "--chromium-arg",
        dest="chromium_args",
        action="append",
        default=[],
        help="extra Chromium flag, e.g. --disable-gpu (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the board's files live (a temp dir)")
    parser.add_argument("--quick", action="store_true", help="a few seconds, small counts")
    args = parser.parse_args(argv)
    if args.quick:
        args.rate, args.duration, args.sessions = 10.0, 2.0, 3
        args.history, args.renders = 200, 2
        args.browsers = 2 if args.browsers is None else args.browsers
    if args.browsers is None or args.browsers > args.sessions:
        args.browsers = args.sessions
    from playwright.sync_api import sync_playwright

    rng = random.Random(args.seed)
    started = time.monotonic()
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{machine()}, Python {platform.python_version()}; load average {load()} (1/5/15 min)")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="board-") as tmp:
        work = Path(tmp)
        fill_history(work / "board.sqlite3", args.history, rng)
        add_user(work / "users", USER, PASSWORD)
        port = free_port()
        broker = Mosquitto(work / "mosquitto")
        (work / "board.toml").write_text(
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
            f'[board]\nlisten = "127.0.0.1:{port}"\nusers_file = "{work / "users"}"\n'
            f'state_file = "{work / "board.sqlite3"}"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        with broker, (work / "board.log").open("wb") as log:
            board = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "board", "--config", f"{work}/board.toml"],
                stdout=log,
                stderr=log,
                env=env,
            )
            try:
                deadline = time.monotonic() + 30
                while not port_open("127.0.0.1", port):
                    if board.poll() is not None or time.monotonic() > deadline:
                        print((work / "board.log").read_text(), file=sys.stderr)
                        return 1
                    time.sleep(0.05)
                return run(args, rng, broker, board, port, sync_playwright)
            finally:
                board.terminate()
                board.wait(20)
                print(f"\nwhole benchmark {time.monotonic() - started:.0f} s; load {load()}")


def run(
    args: argparse.Namespace,
    rng: random.Random,
    broker: Mosquitto,
    board: subprocess.Popen[bytes],
    port: int,
    sync_playwright: Any,
) -> int:
    url = f"http://127.0.0.1:{port}"
    streams: list[StreamClient] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", *args.chromium_args]
        )
        try:
            renders, ttfb, rows = first_renders(browser, url, args.renders)
            print(f"  first renders done; load {load()}", file=sys.stderr)
            pages = []
            for _ in range(args.browsers):
                page = login(browser.new_context(), url)
                page.evaluate(RECORDER)
                pages.append(page)
            for _ in range(args.sessions - args.browsers):
                streams.append(StreamClient(port))
                streams[-1].start()
                streams[-1].ready.wait(10)
            print(
                f"  {len(pages)} pages and {len(streams)} plain streams open; load {load()}",
                file=sys.stderr,
            )
            plain = PlainSubscriber(broker)
            publisher = Publisher(broker)
            time.sleep(1.0)
            idle_start, browser_idle_start = cpu_seconds(board.pid), chromium_cpu_seconds()
            time.sleep(min(args.duration, 10.0))
            idle = (cpu_seconds(board.pid) - idle_start) / min(args.duration, 10.0)
            browser_idle = (chromium_cpu_seconds() - browser_idle_start) / min(args.duration, 10.0)

            n = max(1, round(args.rate * args.duration))
            due, t = [], 0.0
            for _ in range(n):
                t += rng.expovariate(args.rate)
                due.append(t)
            cpu_start, begin = cpu_seconds(board.pid), time.monotonic()
            browser_start = chromium_cpu_seconds()
            uids = []
            for i, at in enumerate(due):
                delay = begin + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                site, device = BOXES[i % len(BOXES)]
                uid = uid_for(i, "2")
                uids.append(uid)
                publisher.publish(site, device, uid, payload(uid, level(rng), time.time(), rng))
            elapsed = time.monotonic() - begin
            end = time.monotonic() + 15
            seen: list[dict[str, float]] = []
            count = f"Object.keys(window.__seen).length >= {len(uids)}"
            while time.monotonic() < end and not (
                all(page.evaluate(count) for page in pages)
                and all(len(s.arrived) >= len(uids) for s in streams)
            ):
                time.sleep(0.5)
            seen = [page.evaluate("window.__seen") for page in pages]
            busy = cpu_seconds(board.pid) - cpu_start
            browser_busy = chromium_cpu_seconds() - browser_start
            acked = publisher.puback_times()
            publisher.close()
            plain.close()
        finally:
            for stream in streams:
                stream.close()
            browser.close()

    board_ms = [
        (s[u] / 1000.0 - acked[u]) * 1000.0 for s in seen for u in uids if u in s and u in acked
    ]
    plain_ms = [(plain.arrived[u] - acked[u]) * 1000.0 for u in uids if u in plain.arrived]
    stream_ms = [
        (s.arrived[u] - acked[u]) * 1000.0 for s in streams for u in uids if u in s.arrived
    ]
    missing = sum(1 for s in seen for u in uids if u not in s)
    missing += sum(1 for s in streams for u in uids if u not in s.arrived)
    lat, base, rend, first, stream = (
        percentiles(board_ms),
        percentiles(plain_ms),
        percentiles(renders),
        percentiles(ttfb),
        percentiles(stream_ms),
    )
    cpu_per_result = max(0.0, busy - idle * (elapsed + 0.2)) / len(uids) * 1000.0
    print(
        f"\n{len(uids)} results at {len(uids) / elapsed:.1f}/s over {elapsed:.1f} s (open-loop "
        f"Poisson, {args.rate:g}/s asked), {args.sessions} sessions open ({len(pages)} "
        f"Chromium pages on this machine, {len(streams)} plain streams), "
        f"{args.history} studies in history ({rows} rows on a page)\n"
    )
    print("Latency from PUBACK, ms:\n")
    print("| receiver | samples | p50 | p95 | p99 | max |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| plain MQTT subscriber (baseline) | {base['n']:.0f} | {base['p50']:.1f} "
        f"| {base['p95']:.1f} | {base['p99']:.1f} | {base['max']:.1f} |"
    )
    if streams:
        print(
            f"| event at a plain stream client | {stream['n']:.0f} | {stream['p50']:.1f} "
            f"| {stream['p95']:.1f} | {stream['p99']:.1f} | {stream['max']:.1f} |"
        )
    print(
        f"| row in a page's DOM | {lat['n']:.0f} | {lat['p50']:.1f} | {lat['p95']:.1f} "
        f"| {lat['p99']:.1f} | {lat['max']:.1f} |"
    )
    print(f"\nrows never shown: {missing}\n")
    print("First render with the history, ms:\n")
    print("| measure | runs | p50 | max |")
    print("| --- | --- | --- | --- |")
    for name, m in (("navigation start → rows in DOM", rend), ("request → first byte", first)):
        print(f"| {name} | {m['n']:.0f} | {m['p50']:.0f} | {m['max']:.0f} |")
    print(
        f"\nboard CPU: {idle * 100:.1f}% idle with {args.sessions} sessions open; "
        f"{cpu_per_result:.2f} ms CPU per result above idle ({busy:.2f} s over the run)"
    )
    if pages:
        per_result = max(0.0, browser_busy - browser_idle * elapsed) / len(uids) / len(pages)
        print(
            f"Chromium CPU ({len(pages)} pages): {browser_idle:.2f} cores idle (the pages' "
            f"clocks), {browser_busy / elapsed:.2f} cores during the run; "
            f"{per_result * 1000:.1f} ms per result per page above idle"
        )
    print(
        f"goal: p99 < {GOAL_P99_MS:.0f} ms: {lat['p99']:.0f} ms, "
        f"{'met' if lat['p99'] < GOAL_P99_MS else 'NOT met'}; first render < "
        f"{GOAL_RENDER_MS:.0f} ms: {rend['p50']:.0f} ms (p50), "
        f"{'met' if rend['p50'] < GOAL_RENDER_MS else 'NOT met'}"
    )
    summary = {"latency": lat, "baseline": base, "stream": stream, "render": rend, "ttfb": first}
    print(json.dumps(summary))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
