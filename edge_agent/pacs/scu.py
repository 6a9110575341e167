"""C-ECHO and C-STORE to the site's PACS (pynetdicom SCU), with a clear reason for a refusal.

Every failure is a :class:`PacsError` whose ``reason`` an operator can act on (it reaches the
log, ``edge-agent status`` and ``edge-agent check``; it never holds patient data) and whose
``retry`` says whether trying the same object again later can succeed:

* the connection refused or timed out, the association aborted or rejected transiently, a
  C-STORE status "out of resources" (0xA7xx) or a peer that went away mid-transfer:
  ``retry=True`` (the PACS is down or busy; the object will be sent again unchanged);
* TLS refused, by either side (the PACS's certificate not signed by ``tls_ca``, no client
  certificate or one the PACS does not trust): ``retry=False``, the reason quotes TLS's
  words and which key to look at;
* the association rejected permanently (called or calling AE title not recognised), the SR's
  SOP class not accepted, a C-STORE status "does not match SOP class" (0xA9xx), "cannot
  understand" (0xCxxx) or another failure: ``retry=False`` until the PACS's configuration
  changes (the caller still retries, slowly, so a fixed PACS gets everything).

A C-STORE warning status (0xB000, 0xB006, 0xB007) means stored.

:class:`Session` sends several SRs over one association (the PACS worker keeps it while rows
are waiting); :func:`store` is one SR over an association of its own.

Every association's socket is tuned against the two ~40 ms stalls that Nagle's algorithm and
delayed ACKs put into each C-STORE exchange (measured on loopback with Orthanc: 120 ms per
C-STORE before, 45 ms after, 28 ms on a reused association): pynetdicom writes the C-STORE
request's command and data set as two PDUs, and Nagle holds the second until the first is
acknowledged, which the PACS delays (``TCP_NODELAY`` on our side); a PACS that writes its
response's PDU header and body separately without ``TCP_NODELAY`` (DCMTK-based ones, Orthanc
among them) waits in turn for our delayed ACK, so after each PDU we send the socket is put
back into quick-ACK mode (``TCP_QUICKACK``, Linux; the kernel leaves it again on its own).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ..config import PacsSettings

logger = logging.getLogger(__name__)

_WARNINGS = {0xB000, 0xB006, 0xB007}

TUNE_TCP = True
"""``TCP_NODELAY`` and quick ACKs on every association (see above); benchmarks/pacs.py turns
it off for its baseline, nothing else should."""


class PacsError(Exception):
    """The PACS did not take it; ``reason`` says why, ``retry`` whether a retry may help."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    called_ae: str
    calling_ae: str
    timeout: float
    tls: ssl.SSLContext | None = None

    @classmethod
    def from_settings(cls, pacs: PacsSettings) -> Peer:
        return cls(
            host=pacs.host,
            port=pacs.port,
            called_ae=pacs.called_ae,
            calling_ae=pacs.calling_ae,
            timeout=pacs.timeout_seconds,
            tls=tls_context(pacs),
        )

    @property
    def where(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"


def tls_context(pacs: PacsSettings) -> ssl.SSLContext | None:
    """A client TLS context from ``tls_ca`` (and the optional client pair), or None."""
    if pacs.tls_ca is None:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pacs.tls_ca))
        if pacs.tls_cert is not None and pacs.tls_key is not None:
            context.load_cert_chain(str(pacs.tls_cert), str(pacs.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise PacsError(f"TLS files: {exc}", retry=False) from exc
    context.sslsocket_class = _TlsSocket
    return context


class _TlsSocket(ssl.SSLSocket):
    """A TLS socket that keeps its TLS errors in ``errors`` (given by :class:`_TlsArgs`).

    pynetdicom logs a failed handshake, or the alert a PACS sends after it (TLS 1.3 refuses
    a client certificate only then, on the first read), and reports a connection that
    closed; what TLS said is what an operator needs."""

    errors: list[tuple[str, str]] | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            self._keep(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # not a failure: a non-blocking read with nothing to read yet
        except ssl.SSLError as exc:
            self._keep(exc)
            # The connection is over; pynetdicom leaves the socket of a failed read open
            # (its log record's traceback keeps it alive), so it is closed here.
            self.close()
            raise

    def _keep(self, exc: ssl.SSLError) -> None:
        # Its words, not the exception: its traceback holds this socket, which would then
        # wait for the garbage collector to be closed.
        if self.errors is not None:
            self.errors.append((exc.reason or "", getattr(exc, "verify_message", None) or ""))


class _TlsArgs:
    """The context pynetdicom wraps one association's socket with: the peer's context, with
    that association's TLS errors kept in ``errors`` (OpenSSL's reason code, and why the
    certificate was not verified)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.errors: list[tuple[str, str]] = []

    def wrap_socket(self, sock: Any, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = self.context.wrap_socket(sock, **kwargs)
        if isinstance(wrapped, _TlsSocket):
            wrapped.errors = self.errors
        return wrapped


def _tls_failure(peer: Peer, code: str, verify_message: str) -> str:
    """What TLS said, and the key that is likely at fault."""
    words = code.lower().replace("_", " ") or "handshake failed"
    if verify_message:
        words += f": {verify_message}"
    if code == "CERTIFICATE_VERIFY_FAILED":
        hint = "the PACS's certificate is not signed by pacs.tls_ca or not for pacs.host"
    elif code == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        hint = "the PACS requires a client certificate it trusts: pacs.tls_cert/pacs.tls_key"
    elif code == "SSLV3_ALERT_HANDSHAKE_FAILURE":  # TLS 1.2 says no more than that
        hint = (
            "no TLS version or cipher in common with the PACS, or it requires a client "
            "certificate it trusts: pacs.tls_cert/pacs.tls_key"
        )
    elif code in (
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV1_ALERT_ACCESS_DENIED",
    ):
        hint = "the PACS does not trust the client certificate pacs.tls_cert"
    else:
        hint = "see pacs.tls_ca/tls_cert/tls_key and the PACS's TLS settings"
    return f"TLS refused with {peer.where}: {words} ({hint})"


def _rejection(primitive: Any) -> str:
    kind = "permanently" if primitive.result == 0x01 else "transiently"
    return f"association rejected {kind} by the {primitive.source_str}: {primitive.reason_str}"


def _quick_ack(sock: socket.socket | None) -> None:
    """Acknowledge the peer's next segment at once (Linux; elsewhere nothing happens)."""
    option = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or option is None:
        return
    with contextlib.suppress(OSError):  # already closed: nothing left to acknowledge
        sock.setsockopt(socket.IPPROTO_TCP, option, 1)


def _socket_of(assoc: Association) -> socket.socket | None:
    transport = assoc.dul.socket
    return transport.socket if transport is not None else None


def _associate(peer: Peer, contexts: list[tuple[str, list[str] | None]]) -> Association:
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = peer.timeout
    ae.dimse_timeout = peer.timeout
    ae.network_timeout = peer.timeout
    ae.connection_timeout = peer.timeout
    for sop_class, syntaxes in contexts:
        if syntaxes is None:
            ae.add_requested_context(sop_class)
        else:
            ae.add_requested_context(sop_class, syntaxes)
    received: list[Any] = []
    opened: list[bool] = []
    tls = _TlsArgs(peer.tls) if peer.tls is not None else None
    handlers: list[Any] = [
        (evt.EVT_ACSE_RECV, lambda event: received.append(event.primitive)),
        (evt.EVT_CONN_OPEN, lambda event: opened.append(True)),
    ]
    if TUNE_TCP:
        handlers.append((evt.EVT_PDU_SENT, lambda event: _quick_ack(_socket_of(event.assoc))))
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.called_ae,
        # pynetdicom only calls wrap_socket on what it takes for the SSLContext.
        tls_args=(cast(ssl.SSLContext, tls), peer.host) if tls is not None else None,
        evt_handlers=handlers,
    )
    if assoc.is_established:
        sock = _socket_of(assoc)
        if sock is not None and TUNE_TCP:
            with contextlib.suppress(OSError):  # closed meanwhile: the next call says so
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return assoc
    if tls is not None and tls.errors:
        raise PacsError(_tls_failure(peer, *tls.errors[0]), retry=False)
    if assoc.is_rejected:
        rejected = [p for p in received if getattr(p, "result", None) in (0x01, 0x02)]
        if rejected:
            raise PacsError(_rejection(rejected[-1]), retry=rejected[-1].result == 0x02)
        raise PacsError("association rejected", retry=False)
    if any(getattr(p, "result", None) == 0x00 for p in received):
        # Accepted, but no presentation context: pynetdicom aborts at once.
        raise PacsError(
            f"{peer.where} does not accept "
            + ", ".join(_context_words(c, ts) for c, ts in contexts)
            + ": enable it on the PACS",
            retry=False,
        )
    if not opened:
        raise PacsError(
            f"cannot connect to {peer.host}:{peer.port} (connection refused or timed out)",
            retry=True,
        )
    if assoc.is_aborted:
        raise PacsError(f"association aborted by {peer.where}", retry=True)
    raise PacsError(f"no answer to the association request from {peer.where}", retry=True)


def _context_words(sop_class: str, syntaxes: list[str] | None) -> str:
    uid = UID(sop_class)
    words = f"the SOP class {uid.name} ({uid})"
    if syntaxes:
        words += " in transfer syntax " + " or ".join(UID(ts).name for ts in syntaxes)
    return words


def echo(peer: Peer, *, sop_classes: tuple[str, ...] = ()) -> None:
    """C-ECHO: raises :class:`PacsError` unless the PACS answers with success and, for each
    of ``sop_classes``, accepts a presentation context (in any transfer syntax offered)."""
    contexts: list[tuple[str, list[str] | None]] = [(Verification, None)]
    assoc = _associate(peer, contexts + [(c, None) for c in sop_classes])
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        refused = [c for c in sop_classes if c not in accepted]
        if refused:
            raise PacsError(
                f"{peer.where} does not accept "
                + ", ".join(_context_words(c, None) for c in refused)
                + ": enable it on the PACS",
                retry=False,
            )
        status = assoc.send_c_echo()
        if not status or "Status" not in status:
            raise PacsError("no answer to C-ECHO (association closed)", retry=True)
        if status.Status != 0x0000:
            raise PacsError(f"C-ECHO failed with status 0x{status.Status:04X}", retry=True)
    finally:
        if assoc.is_established:
            assoc.release()


class Session:
    """C-STOREs over one association, opened when the first data set is sent and kept until
    :meth:`close`, :data:`MAX_STORES` stores or :data:`MAX_SECONDS` after it opened (a PACS
    may count or time its associations; a fresh one now and then costs ~10 ms). A data set of
    another SOP class or transfer syntax opens a new association for it.

    A failure raises :class:`PacsError` for the data set being sent, and only for it: a
    refusal by status leaves the association open for the next one; an association that
    closed, aborted or timed out is dropped, and the next :meth:`store` opens a new one.
    Not thread-safe: one owner (the PACS worker)."""

    MAX_STORES = 100
    MAX_SECONDS = 60.0

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self._assoc: Association | None = None
        self._context: tuple[str, str] | None = None
        self._opened = 0.0
        self._stores = 0
        self.last_used = 0.0
        self.associations = 0
        """How many associations this session opened (for the tests and the benchmark)."""

    @property
    def is_open(self) -> bool:
        return self._assoc is not None and self._assoc.is_established

    def store(self, ds: Dataset) -> None:
        """C-STORE ``ds`` (in its own transfer syntax): returns when the PACS stored it,
        raises :class:`PacsError` otherwise."""
        context = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if (
            self._assoc is None
            or not self._assoc.is_established
            or context != self._context
            or self._stores >= self.MAX_STORES
            or time.monotonic() - self._opened >= self.MAX_SECONDS
        ):
            self.close()
            self._assoc = _associate(self.peer, [(context[0], [context[1]])])
            self._context = context
            self._opened = time.monotonic()
            self._stores = 0
            self.associations += 1
        assoc = self._assoc
        self._stores += 1
        self.last_used = time.monotonic()
        try:
            status = assoc.send_c_store(ds)
        except Exception:
            self.close()
            raise
        if not status or "Status" not in status:
            self.close()
            raise PacsError("no answer to C-STORE (association closed or timed out)", retry=True)
        code = int(status.Status)
        if code == 0x0000 or code in _WARNINGS:
            if code:
                logger.info("PACS stored the SR with warning status 0x%04X", code)
            return
        raise PacsError(_store_failure(code), retry=_retryable(code))

    def close(self) -> None:
        """Release the association (abort it when the PACS does not answer the release)."""
        assoc, self._assoc, self._context = self._assoc, None, None
        if assoc is None:
            return
        if assoc.is_established:
            assoc.release()
        if not (assoc.is_released or assoc.is_aborted):
            assoc.abort()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def store(peer: Peer, ds: Dataset) -> None:
    """C-STORE ``ds`` over an association of its own: returns when the PACS stored it,
    raises :class:`PacsError` otherwise."""
    with Session(peer) as session:
        session.store(ds)


def _retryable(code: int) -> bool:
    return code & 0xFF00 == 0xA700 or code == 0x0110


def _store_failure(code: int) -> str:
    """The status's meaning. The PACS's Error Comment is left out: free text from the PACS
    may quote the data set (a patient name in a mismatch message), and the reason reaches
    the log, ``edge-agent status`` and the MQTT status message."""
    if code & 0xFF00 == 0xA700:
        what = "refused: out of resources"
    elif code & 0xFF00 == 0xA900:
        what = "error: data set does not match SOP class"
    elif code & 0xF000 == 0xC000:
        what = "error: cannot understand"
    elif code == 0x0122:
        what = "refused: SOP class not supported"
    elif code == 0x0124:
        what = "refused: not authorised"
    else:
        what = "failed"
    return f"C-STORE {what} (status 0x{code:04X})"
