"""Composition of the board: store, MQTT subscriber, event fan-out, web app, uvicorn.

:class:`BoardServer` runs in the foreground (``edge-agent board``: uvicorn handles SIGTERM
and SIGINT) or in a thread (``edge-agent demo``, tests): :meth:`start_in_thread` returns
once the port is listening.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import uvicorn

from ..config import Settings, listen_address
from ..errors import ResourceMissing
from .app import Board
from .events import Events
from .store import BoardStore
from .subscriber import BoardClient
from .worklist import present

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECONDS = 3


class BoardServer:
    def __init__(self, settings: Settings, *, port: int | None = None) -> None:
        self.settings = settings
        host, listen_port = listen_address(settings.board.listen)
        self.host, self.port = host, listen_port if port is None else port
        self.events = Events()
        self.store = BoardStore(settings.board.state_file)
        viewer = settings.board.viewer_url

        def notify(event: str, data: dict[str, Any]) -> None:
            self.events.publish(event, present(data, viewer) if event == "study" else data)

        self.client = BoardClient(settings, self.store, notify)
        self.board = Board(settings, self.store, self.client, self.events)
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.board.app(),
                host=self.host,
                port=self.port,
                log_level="warning",
                access_log=False,
                # Forwarded headers are read by the app, from trusted_proxies only.
                proxy_headers=False,
                server_header=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop cleanly (open streams are ended, the MQTT
        session is closed with a DISCONNECT, the store closed) and return.

        uvicorn runs in a thread: in the main thread it would re-raise the signal after its
        own shutdown, and the process would end by it instead of exiting 0."""
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            logger.info("signal %s: stopping the board", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start_in_thread()
        logger.info("triage board on %s", self.url)
        try:
            while not stop.wait(1.0):
                if self._thread is not None and not self._thread.is_alive():
                    raise ResourceMissing("the board's web server stopped")
        finally:
            self.stop()

    def start_in_thread(self, timeout: float = 10.0) -> None:
        """Start the MQTT client and the web server; return once the port listens."""
        self.client.start()
        self._thread = threading.Thread(target=self._server.run, name="board-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ResourceMissing(f"the board could not listen on {self.host}:{self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.events.shutdown_threadsafe()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(GRACEFUL_SHUTDOWN_SECONDS + 2)
        self.client.stop()
        self.store.close()
