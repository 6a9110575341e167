"""Fan-out of changes to the open pages: one bounded queue per event stream.

:meth:`Events.publish` is called from paho's network thread; it hands the encoded event to
the web server's event loop, which puts it in every stream's queue. A page too slow to keep
up (its queue full) is disconnected rather than allowed to grow memory without bound; its
EventSource reconnects and the page loads the current state again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

QUEUE_EVENTS = 2000
CLOSED = ""  # put in a stream's queue to end it


def encode(event: str, data: dict[str, Any]) -> str:
    """One server-sent event (json.dumps never emits a newline, so one data line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Events:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: set[asyncio.Queue[str]] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the streams live on (the web server's), set at start-up."""
        self._loop = loop

    def open(self) -> asyncio.Queue[str]:
        stream: asyncio.Queue[str] = asyncio.Queue(QUEUE_EVENTS)
        self._streams.add(stream)
        return stream

    def close(self, stream: asyncio.Queue[str]) -> None:
        self._streams.discard(stream)

    @property
    def streams(self) -> int:
        return len(self._streams)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        """From any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        text = encode(event, data)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutdown)
            loop.call_soon_threadsafe(self._fan_out, text)

    def shutdown_threadsafe(self) -> None:
        """End every stream, from any thread (uvicorn waits for open streams to end)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.shutdown)

    def shutdown(self) -> None:
        """End every stream (the server is stopping)."""
        for stream in list(self._streams):
            self._end(stream)

    def _fan_out(self, text: str) -> None:
        for stream in list(self._streams):
            try:
                stream.put_nowait(text)
            except asyncio.QueueFull:
                logger.warning("an event stream fell %d events behind; closing it", QUEUE_EVENTS)
                self._end(stream)

    def _end(self, stream: asyncio.Queue[str]) -> None:
        self._streams.discard(stream)
        while True:
            try:
                stream.get_nowait()
            except asyncio.QueueEmpty:
                break
        stream.put_nowait(CLOSED)
