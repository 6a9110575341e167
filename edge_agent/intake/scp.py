"""Receiving instances that modalities push: a DICOM Storage SCP (C-STORE, C-ECHO).

    modality ──C-STORE──▶ StorageSCP ──atomic write──▶ receive_dir/<Study>/<SOP>.dcm
        ──▶ ReceivedFolder (the intake's second root) ──▶ header, store … as for the watch folder

The watch folder is read-only to the agent, so received instances go to a folder the agent
owns (``scp.receive_dir``, default ``<state_dir>/received``). Each instance is written the
way a careful modality writes a folder: into a hidden temporary name in its study folder,
flushed and fsynced, renamed to ``<SOPInstanceUID>.dcm``, then the folder is fsynced. Only
then does the sender get *Success*; a write that fails (disk full, read-only folder, …) is
answered ``0xA700`` (*Refused: out of resources*), so the modality keeps the instance and
sends it again later. File and folder names are built from UIDs that were checked to be
digits and dots, never from anything else the peer sent.

Every storage SOP class pynetdicom knows is accepted (objects the agent does not triage are
recorded as skipped by the intake, like files in the watch folder), plus Verification
(C-ECHO). Transfer syntaxes: the uncompressed ones first, then every compressed syntax that
pydicom can decode here (lossless before lossy), so a modality can send its images as they
are instead of decompressing them.

Associations are rejected unless the called AE title is ``scp.ae_title`` and, when
``scp.allowed_calling_aes`` is not empty, the calling AE title is in it. Logs name AE
titles, addresses and UIDs only, never patient data.

:class:`ReceivedFolder` hands the received files to the intake loop. The SCP tells it about
each file it stored; at start it walks the folder once for files stored before a crash and
not yet recorded. Each file it hands out has this folder as its ``root`` and
``<Study>/<SOP>.dcm`` as its ``relpath``; the store records it by its absolute path
(``ReadyFile.recorded``), which :func:`published_path` turns into
``received/<Study>/<SOP>.dcm`` for ``P/rejected``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import socketserver
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath

from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    VerificationPresentationContexts,
)
from pynetdicom.transport import ThreadedAssociationServer

from ..config import ScpSettings
from ..dicom.errors import reading
from ..dicom.uid import UID_PADDING, uid_problem, valid_uid
from ..errors import ConfigError, EdgeTriageError, InputRejected, ResourceMissing
from ..fsutil import fsync_dir
from .watcher import ReadyFile, still_same

logger = logging.getLogger(__name__)

RECEIVED_PREFIX = "received"  # first segment of a received file's path on P/rejected

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # the instance is not on disk: the sender tries again
STATUS_STOPPING = 0xA701  # refused because the agent is stopping: the sender tries again
# PS3.4 B.2.3 (Table B.2-1), "Error: Cannot understand" (0xCxxx): the data set has no usable
# Study or SOP Instance UID (missing, or malformed under the one UID rule), or cannot be
# decoded; sending it again will not help. Not 0xA900 "Data Set does not match SOP Class":
# the UIDs are not what the SOP class's IOD is judged by.
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110  # PS3.7 C.4: an unexpected error of ours (logged)
TEMPORARY_SUFFIX = ".part"  # store_instance's hidden temporary names: .<SOP>.<random>.part

UNCOMPRESSED = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
# Lossless compressed syntaxes (PS3.5 Annex A), preferred to lossy ones when a peer offers
# both in one presentation context.
LOSSLESS = frozenset(
    {
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.5",  # RLE Lossless
    }
)
SERVE_POLL_SECONDS = 0.5
ABORT_JOIN_SECONDS = 1.0  # at stop, how long aborted associations' threads are waited for


def transfer_syntaxes() -> list[str]:
    """The transfer syntaxes accepted: uncompressed, then the compressed ones pydicom can
    decode with the plugins installed here (lossless first)."""
    compressed: list[str] = []
    for uid in AllTransferSyntaxes:
        if uid in UNCOMPRESSED or not uid.is_compressed:
            continue
        try:
            if get_decoder(uid).is_available:
                compressed.append(uid)
        except NotImplementedError:
            continue  # no decoder exists for it (video, JPIP, …)
    compressed.sort(key=lambda uid: uid not in LOSSLESS)  # stable: lossless first
    return [*UNCOMPRESSED, *compressed]


def store_instance(receive_dir: Path, study_uid: str, sop_uid: str, data: bytes) -> Path:
    """Write ``data`` durably as ``receive_dir/<study_uid>/<sop_uid>.dcm``.

    Written to a hidden temporary name in the same folder, fsynced, renamed over the final
    name, and the folder fsynced; nothing is left under the temporary name on failure. A
    new study folder is fsynced into ``receive_dir`` too. Raises OSError; the UIDs must have
    passed :func:`valid_uid` (they become path components).
    """
    if valid_uid(study_uid) != study_uid or valid_uid(sop_uid) != sop_uid:
        raise ValueError("study and SOP instance UIDs must be valid UIDs without padding")
    folder = receive_dir / study_uid
    try:
        folder.mkdir(mode=0o750)
    except FileExistsError:
        pass
    else:
        fsync_dir(receive_dir)
    final = folder / f"{sop_uid}.dcm"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{sop_uid}.", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    return final


def _study_files(root: Path) -> Iterator[os.DirEntry[str]]:
    """The entries of each study folder in ``root`` (``<Study>/…``), folders and entries in
    name order; hidden study folders and links are passed over, and a folder that cannot be
    listed is logged and passed over too."""
    try:
        with os.scandir(root) as listing:
            studies = sorted(listing, key=lambda e: e.name)
    except OSError as exc:
        logger.warning("cannot list %s: %s", root, exc.strerror)
        return
    for study in studies:
        if study.name.startswith(".") or not study.is_dir(follow_symlinks=False):
            continue
        try:
            with os.scandir(study.path) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            logger.warning("cannot list %s: %s", study.path, exc.strerror)
            continue
        yield from entries


def listen_error(settings: ScpSettings, exc: OSError) -> EdgeTriageError:
    """What a failure to listen means, naming the setting to look at."""
    where = f"{settings.bind_address} port {settings.port}"
    if exc.errno == errno.EADDRINUSE:
        return ResourceMissing(
            f"scp.port: cannot listen on {where}: already in use (another agent or DICOM service?)"
        )
    if exc.errno == errno.EACCES:
        return ConfigError(
            "scp.port",
            f"no permission to listen on {where} (ports below 1024 need "
            "CAP_NET_BIND_SERVICE; the default 11112 does not)",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(
            "scp.bind_address", f"{settings.bind_address} is not an address of this machine"
        )
    return ResourceMissing(f"scp: cannot listen on {where}: {exc.strerror or exc}")


def check_listen(settings: ScpSettings) -> None:
    """Bind (and release) the SCP's address as the agent would; raises what
    :func:`listen_error` says when that fails."""
    family = socket.AF_INET6 if ":" in settings.bind_address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom does
        try:
            sock.bind((settings.bind_address, settings.port))
        except OSError as exc:
            raise listen_error(settings, exc) from exc


def published_path(path: str) -> str:
    """The path ``P/rejected`` shows: a received file (recorded by its absolute path) as
    ``received/<StudyInstanceUID>/<SOPInstanceUID>.dcm``; a watch-folder path unchanged."""
    pure = PurePosixPath(path)
    if not pure.is_absolute():
        return path
    return "/".join((RECEIVED_PREFIX, *pure.parts[-2:]))


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, run by a thread of ours (the watchdog checks it) and
    not registered with the AE, so shutting it down is plain socketserver."""

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)  # serve_forever returns
        self.server_close()


def _caller(event: Event) -> tuple[str, str]:
    """(calling AE title, peer address) of the association an event belongs to."""
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address)


class StorageSCP:
    """The Storage SCP. :meth:`start` binds and serves in thread ``scp``; :meth:`stop`
    refuses new work, lets stores being written finish, aborts the rest."""

    def __init__(
        self,
        settings: ScpSettings,
        receive_dir: Path,
        on_stored: Callable[[Path], None] | None = None,
    ) -> None:
        self.settings = settings
        self.receive_dir = receive_dir
        self.on_stored = on_stored
        self.syntaxes = transfer_syntaxes()
        self.ae = self._make_ae()
        self._server: _AssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._writing = 0
        self._stopping = False

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.maximum_associations = s.max_associations
        ae.require_calling_aet = list(s.allowed_calling_aes)
        ae.require_called_aet = True
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, self.syntaxes)
        for cx in VerificationPresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, list(UNCOMPRESSED))
        return ae

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) listened on."""
        if self._server is None:
            return self.settings.bind_address, self.settings.port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Create ``receive_dir``, bind and start serving. Raises ConfigError or
        ResourceMissing (naming the setting) when the folder or the address cannot be used."""
        try:
            self.receive_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                "scp.receive_dir", f"cannot create {self.receive_dir}: {exc.strerror}"
            ) from exc
        self._remove_temporaries()
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            server = self.ae.make_server(
                (self.settings.bind_address, self.settings.port),
                evt_handlers=handlers,
                server_class=_AssociationServer,
            )
        except OSError as exc:
            raise listen_error(self.settings, exc) from exc
        assert isinstance(server, _AssociationServer)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(SERVE_POLL_SECONDS,), name="scp", daemon=True
        )
        self._thread.start()
        host, port = self.address
        logger.info(
            "DICOM Storage SCP %s listening on %s port %d; received instances go to %s",
            self.settings.ae_title,
            host,
            port,
            self.receive_dir,
        )
        if not self.settings.allowed_calling_aes:
            logger.warning(
                "scp.allowed_calling_aes is empty: any calling AE title may store instances; "
                "list the modalities' AE titles to refuse others"
            )

    def _remove_temporaries(self) -> None:
        """Delete the temporary files of transfers cut short (a kill, a power cut) before
        they were renamed into place; their senders got no Success and send them again."""
        removed = 0
        for entry in _study_files(self.receive_dir):
            if not (entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIX)):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
            except OSError as exc:
                logger.warning("cannot remove %s: %s", entry.name, exc.strerror)
        if removed:
            logger.info(
                "removed %d temporary file(s) of C-STOREs cut short before this start "
                "(their senders were not told Success and send them again)",
                removed,
            )

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def associations(self) -> int:
        """Associations open now."""
        return len(self._server.active_associations) if self._server is not None else 0

    def stop(self, timeout: float) -> bool:
        """Stop listening, refuse new C-STOREs, let stores being written finish (up to
        ``timeout``), then abort the associations still open (their senders try again
        later). True when no store was cut short."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
        server = self._server
        if server is None:
            return True
        if self._thread is not None and self._thread.is_alive():
            server.shutdown()
        else:
            server.server_close()
        with self._cond:
            clean = self._cond.wait_for(
                lambda: self._writing == 0, timeout=max(0.0, deadline - time.monotonic())
            )
        open_ = server.active_associations
        established = sum(1 for assoc in open_ if assoc.is_established)
        for assoc in open_:
            assoc.abort()
        # A connection that never sent its association request keeps its (daemon) thread
        # waiting up to the ACSE timeout whatever abort() does: wait for none for long.
        joined = min(deadline, time.monotonic() + ABORT_JOIN_SECONDS)
        for assoc in open_:
            assoc.join(timeout=max(0.0, joined - time.monotonic()))
        self._server = None
        if not clean:
            logger.warning("stopping: a C-STORE was still being written; its sender retries")
        logger.info("DICOM Storage SCP stopped (%d open association(s) aborted)", established)
        return clean

    # -- event handlers (association threads) ---------------------------------------------

    def _on_accepted(self, event: Event) -> None:
        ae_title, address = _caller(event)
        logger.info("association from %s (calling AE %r) accepted", address, ae_title)

    def _on_rejected(self, event: Event) -> None:
        ae_title, address = _caller(event)
        primitive = event.assoc.requestor.primitive
        called = str(getattr(primitive, "called_ae_title", "") or "").strip()
        allowed = self.settings.allowed_calling_aes
        if allowed and ae_title not in allowed:
            why = "calling AE title not in scp.allowed_calling_aes"
        elif called != self.settings.ae_title:
            why = f"called AE title {called!r} is not scp.ae_title {self.settings.ae_title!r}"
        else:
            why = "no accepted presentation context or too many associations"
        logger.warning("association from %s (calling AE %r) rejected: %s", address, ae_title, why)

    def _on_store(self, event: Event) -> int:
        with self._cond:
            if self._stopping:
                return STATUS_STOPPING
            self._writing += 1
        try:
            return self._store(event)
        except Exception as exc:
            # A bug of ours must not become pynetdicom's traceback and 0xC211: one line, and
            # a standard failure status the modality can show.
            logger.error(
                "C-STORE from %s refused (0x%04X processing failure): %s",
                _caller(event)[1],
                STATUS_PROCESSING_FAILURE,
                type(exc).__name__,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            return STATUS_PROCESSING_FAILURE
        finally:
            with self._cond:
                self._writing -= 1
                self._cond.notify_all()

    def _store(self, event: Event) -> int:
        ae_title, address = _caller(event)
        try:
            with reading("the data set cannot be decoded ({error})"):
                ds: Dataset = event.dataset
                study_value = ds.get("StudyInstanceUID")
                sop_value = ds.get("SOPInstanceUID")
        except InputRejected as exc:
            logger.warning("C-STORE from %s (%r) refused: %s", address, ae_title, exc.reason)
            return STATUS_CANNOT_UNDERSTAND
        affected = valid_uid(getattr(event.request, "AffectedSOPInstanceUID", None))
        if sop_value is None or not str(sop_value).strip(UID_PADDING):
            sop_value = affected  # tolerant: the command names the instance too
        # The UIDs name the file and its folder: one rule decides (edge_agent/dicom/uid.py),
        # and the reason logged never quotes the value.
        for keyword, value in (("StudyInstanceUID", study_value), ("SOPInstanceUID", sop_value)):
            problem = uid_problem(value)
            if problem is not None:
                logger.warning(
                    "C-STORE from %s (%r) refused (0x%04X cannot understand): %s %s",
                    address,
                    ae_title,
                    STATUS_CANNOT_UNDERSTAND,
                    keyword,
                    problem,
                )
                return STATUS_CANNOT_UNDERSTAND
        study, sop = valid_uid(study_value), valid_uid(sop_value)
        assert study is not None and sop is not None
        if affected is not None and affected != sop:
            logger.warning(
                "C-STORE from %s (%r): command names instance %s, data set %s; stored as %s",
                address,
                ae_title,
                affected,
                sop,
                sop,
            )
        meta = event.file_meta
        meta.SourceApplicationEntityTitle = ae_title  # who sent it (PS3.10 7.1)
        data = b"".join(
            (b"\0" * 128, b"DICM", encode_file_meta(meta), event.encoded_dataset(False))
        )
        try:
            path = store_instance(self.receive_dir, study, sop, data)
        except OSError as exc:
            logger.error(
                "instance %s of study %s from %r not stored (%s): answered 'out of resources', "
                "the sender will try again",
                sop,
                study,
                ae_title,
                exc.strerror or type(exc).__name__,
            )
            return STATUS_OUT_OF_RESOURCES
        logger.info("received instance %s of study %s from %r", sop, study, ae_title)
        if self.on_stored is not None:
            self.on_stored(path)
        return STATUS_SUCCESS


class ReceivedFolder:
    """The receive folder as the intake's second root, with the calls the intake loop makes
    on a :class:`~edge_agent.intake.watcher.FolderWatcher` (``scan``, ``mark_handled``,
    ``still_same``).

    Files arrive complete (renamed into place), so they need no stability wait. The SCP
    reports each file it stored (:meth:`stored`, any thread); the first scan walks the
    folder for files stored before a restart and not yet recorded (``handled``: the store's
    signatures, keyed by the recorded path). Each :class:`ReadyFile` carries this folder as
    its ``root`` and ``<Study>/<SOP>.dcm`` as its ``relpath``. It is ``recorded`` (files
    table, instances, file_id) by its absolute path, as state databases have always held
    received files: a path relative to the receive folder would collide with a watch-folder
    path of the same name, and the absolute one tells the scorer and the narrative worker
    which folder to open it in (:mod:`edge_agent.dicom.instance_file` opens an absolute
    path from its own folder). A file handed out stays queued until it is marked handled.
    """

    def __init__(
        self,
        root: Path,
        *,
        handled: Mapping[str, tuple[int, int]] | None = None,
        batch_size: int = 64,
    ) -> None:
        self.root = Path(os.path.abspath(root))
        prefix = f"{self.root}{os.sep}"
        self._handled = {p: sig for p, sig in (handled or {}).items() if p.startswith(prefix)}
        self.batch_size = max(1, batch_size)
        self._lock = threading.Lock()
        self._reported: dict[str, None] = {}  # filled by the SCP's threads
        self._queue: dict[str, None] = {}  # ordered: oldest first
        self._walked = False
        self.more_ready = False  # the last scan stopped at batch_size with more ready

    def stored(self, path: Path) -> None:
        with self._lock:
            self._reported[str(path)] = None

    def _walk(self) -> Iterator[str]:
        for entry in _study_files(self.root):
            if not entry.name.startswith(".") and entry.name.endswith(".dcm"):
                yield entry.path

    def scan(self, now: float) -> list[ReadyFile]:
        """Received files not yet handled, oldest first, at most ``batch_size``."""
        if not self._walked:
            self._walked = True
            for path in self._walk():
                self._queue[path] = None
        with self._lock:
            reported, self._reported = self._reported, {}
        for path in reported:
            self._queue.pop(path, None)
            self._queue[path] = None
        ready: list[ReadyFile] = []
        self.more_ready = False
        for path in list(self._queue):
            if len(ready) >= self.batch_size:
                self.more_ready = True
                break
            try:
                st = os.lstat(path)
            except OSError:
                del self._queue[path]
                continue
            if not stat.S_ISREG(st.st_mode) or self._handled.get(path) == (
                st.st_size,
                st.st_mtime_ns,
            ):
                del self._queue[path]
                continue
            del self._queue[path]  # to the back of the line until it is marked handled
            self._queue[path] = None
            relpath = os.path.relpath(path, self.root).replace(os.sep, "/")
            ready.append(
                ReadyFile(
                    Path(path),
                    relpath,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ino,
                    root=self.root,
                    recorded=path,
                )
            )
        return ready

    def mark_handled(self, f: ReadyFile) -> None:
        self._handled[f.recorded] = (f.size, f.mtime_ns)
        self._queue.pop(f.recorded, None)

    def still_same(self, f: ReadyFile) -> bool:
        return still_same(f)

    @property
    def waiting(self) -> int:
        return len(self._queue)
